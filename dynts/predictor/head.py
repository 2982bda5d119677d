"""The Importance Predictor head: an MLP on the final-norm hidden state, saved apart from its base model.

    head = ImportancePredictor.for_model(model)          # sizes from the model config
    head.save("ip-head", identity=ModelIdentity.of(model))
    head = ImportancePredictor.load("ip-head", model=model)  # refuses a different model

Files: ``head.safetensors`` (the three weight matrices and the base model's fingerprint) and ``head.json``
(format version, base model name and type, hidden size, layer count, vocabulary size).

Which model a head belongs to: names are not reliable (the same checkpoint loads from a hub id or a local
directory; models built from a config have no name), so a head is checked against the model's *weights*: a
fingerprint of a few embedding rows and the final norm weight, compared with a tolerance that absorbs a
change of dtype (fp32 / bf16 / fp16 loads of one checkpoint pass). Sizes are checked exactly first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..modeling import decoder_module

FORMAT = "dynts-importance-predictor"
FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"
FINGERPRINT_KEY = "base_model_fingerprint"

# Fingerprint: these embedding rows, sampled at about this many columns each, plus the final norm weight.
_FINGERPRINT_ROWS = 8
_FINGERPRINT_COLUMNS = 256
# bf16 keeps 8 significant bits (relative error <= 2**-8); a different checkpoint differs by far more.
_FINGERPRINT_RTOL = 1e-2


@dataclass
class ModelIdentity:
    """What a head records about the model whose hidden states it reads."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    fingerprint: torch.Tensor = field(repr=False)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelIdentity":
        config = model.config.get_text_config(decoder=True)
        return cls(
            name=str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
            model_type=str(getattr(config, "model_type", "")),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            vocab_size=int(config.vocab_size),
            fingerprint=model_fingerprint(model),
        )

    def metadata(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("fingerprint")
        return values

    def check_compatible(self, model: nn.Module, what: str = "predictor head") -> None:
        """Raise ValueError if ``model`` is not the model this identity describes."""
        other = ModelIdentity.of(model)
        base = f"{self.name or '(unnamed)'} ({self.model_type}, hidden size {self.hidden_size})"
        given = f"{other.name or '(unnamed)'} ({other.model_type}, hidden size {other.hidden_size})"
        for attribute in ("hidden_size", "num_layers", "vocab_size", "model_type"):
            expected, found = getattr(self, attribute), getattr(other, attribute)
            if expected != found:
                raise ValueError(
                    f"{what} was trained on {base} and cannot score {given}: {attribute} is {found}, the head "
                    f"needs {expected}"
                )
        if self.fingerprint.shape != other.fingerprint.shape or not _close(self.fingerprint, other.fingerprint):
            raise ValueError(
                f"{what} was trained on {base}; the given model {given} has the same sizes but different weights "
                "(embedding / final-norm fingerprint mismatch): train a head for this model"
            )


def model_fingerprint(model: nn.Module) -> torch.Tensor:
    """A few thousand weight values that tell checkpoints apart: sampled embedding rows and the final norm weight."""
    embedding = model.get_input_embeddings().weight.detach()
    rows = min(_FINGERPRINT_ROWS, embedding.shape[0])
    stride = max(1, embedding.shape[1] // _FINGERPRINT_COLUMNS)
    parts = [embedding[:rows, ::stride].float().reshape(-1).cpu()]
    norm = getattr(decoder_module(model), "norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        parts.append(weight.detach().float().reshape(-1).cpu())
    return torch.cat(parts)


def _close(expected: torch.Tensor, found: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(found, expected, rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_RTOL * scale))


class ImportancePredictor(nn.Module):
    """d -> 2d -> d/2 -> 1, Softplus after every layer (the output too: scores are positive), no bias.

    ``forward(hidden)`` maps final-norm hidden states [..., d] to scores [...]. The two wide layers run in the
    dtype of ``hidden_layers`` (cast to the model's dtype at inference); the last projection always runs in
    float32, so scores keep full precision for ranking (bf16 scores would tie).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 2:
            raise ValueError(f"hidden_size must be an int >= 2, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.hidden_layers = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size, bias=False),
            nn.Softplus(),
            nn.Linear(2 * hidden_size, hidden_size // 2, bias=False),
            nn.Softplus(),
        )
        self.output = nn.Linear(hidden_size // 2, 1, bias=False)

    @classmethod
    def for_model(cls, model: nn.Module) -> "ImportancePredictor":
        """A freshly initialised head sized from ``model``'s config."""
        return cls(int(model.config.get_text_config(decoder=True).hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden states have size {hidden.shape[-1]}; this predictor head reads hidden size {self.hidden_size}"
            )
        features = self.hidden_layers(hidden.to(self.hidden_layers[0].weight.dtype))
        return F.softplus(self.output(features.to(self.output.weight.dtype))).squeeze(-1)

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token: 2 * (2d^2 + d^2 + d/2) ~= 6 d^2."""
        d = self.hidden_size
        return 2 * (d * 2 * d + 2 * d * (d // 2) + d // 2)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path, identity: ModelIdentity, extra: dict[str, Any] | None = None) -> Path:
        """Write ``head.safetensors`` and ``head.json`` into ``directory`` (created if needed)."""
        if identity.hidden_size != self.hidden_size:
            raise ValueError(f"identity hidden_size {identity.hidden_size} != head hidden_size {self.hidden_size}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().float().contiguous().cpu() for name, tensor in self.state_dict().items()}
        tensors[FINGERPRINT_KEY] = identity.fingerprint.float().contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": identity.metadata(), **(extra or {})}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> "ImportancePredictor":
        """Read a head saved by ``save``; with ``model``, first check that it is the head's base model."""
        head, identity = cls.load_with_identity(directory)
        if model is not None:
            identity.check_compatible(model, what=f"predictor head {directory}")
        return head

    @classmethod
    def load_with_identity(cls, directory: str | Path) -> tuple["ImportancePredictor", ModelIdentity]:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"predictor head: {path} not found (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"predictor head: {config_path} is not valid JSON ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            found = meta if not isinstance(meta, dict) else {k: meta.get(k) for k in ("format", "format_version")}
            raise ValueError(
                f"predictor head: {config_path} is not a dynts predictor head of format version {FORMAT_VERSION} "
                f"(found {found!r})"
            )
        try:
            tensors = load_file(str(weights_path))
        except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
            raise ValueError(f"predictor head: cannot read {weights_path} ({type(error).__name__}: {error})") from error
        try:
            identity = ModelIdentity(**meta["base_model"], fingerprint=tensors.pop(FINGERPRINT_KEY))
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"predictor head: {config_path} / {weights_path} lack the base-model record ({error}); re-save the head"
            ) from error
        head = cls(identity.hidden_size)
        try:
            head.load_state_dict(tensors)
        except RuntimeError as error:
            raise ValueError(f"predictor head: the weights in {weights_path} do not fit a head of hidden size "
                             f"{identity.hidden_size} ({error})") from error
        return head, identity

