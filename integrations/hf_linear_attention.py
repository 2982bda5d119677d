"""Serve transformers' linear-attention calls (KDA, Gated DeltaNet) with dynts's Triton kernels.

    from dynts.integrations.hf_linear_attention import use_dynts_linear_attention

    backend = use_dynts_linear_attention(model)      # on until backend.disable()
    with use_dynts_linear_attention(model):          # or only inside the block
        model.generate(...)

Why this hook: transformers decorates its reference functions (``chunk_kimi_delta_attention``,
``torch_chunk_gated_delta_rule``, ...) with ``use_kernel_func_from_hub_with_fallback("chunk_kda", "fla")``. That
decorator resolves the implementation once, when the modeling module is imported (hub kernel, else the ``fla``
package, else the torch code), and the model's forward looks the decorated function up by its module-level name
at every call. The only runtime switch that needs neither the ``kernels`` package nor a fake ``fla`` is therefore
that module attribute: while the backend is on, each dispatch point found in the model's modeling modules is
rebound to an adapter that calls dynts's op with fla's signature, and the original object is put back on
``disable()``. Dispatch points are recognised by the hub function name they were registered under, so every
model that routes through them (Kimi Linear, Qwen3-Next, Qwen3.5, ...) is served, in transformers 5.17-5.19.
The switch is process-wide for those modeling modules (every model of these classes), like the decorator's own
choice. Causal-conv1d calls keep transformers' own path.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import ModuleType

import torch

from dynts.kernels import linear_attention

# Hub function name (as registered by transformers) -> dynts op serving it.
SERVED_OPS: dict[str, Callable] = {
    "chunk_kda": linear_attention.chunk_kda,
    "fused_recurrent_kda": linear_attention.fused_recurrent_kda,
    "chunk_gated_delta_rule": linear_attention.chunk_gated_delta_rule,
    "fused_recurrent_gated_delta_rule": linear_attention.fused_recurrent_gated_delta_rule,
}

# fla options that change the math; dynts implements their defaults only, so any other value is refused rather
# than dropped (transformers' own kwargs, e.g. position ids or attention-mask metadata, are dropped as for fla).
_FLA_OPTION_DEFAULTS = {
    "use_gate_in_kernel": False,
    "use_beta_sigmoid_in_kernel": False,
    "allow_neg_eigval": False,
    "safe_gate": False,
    "lower_bound": None,
    "A_log": None,
    "dt_bias": None,
    "gk": None,
    "gv": None,
    "state_v_first": False,
    "return_intermediate_states": False,
    "cp_context": None,
    "chunk_size": 64,
}


def _hub_function_name(obj: object) -> str | None:
    """The hub name a transformers dispatch point was registered under, or None for anything else."""
    name = getattr(type(obj), "kernel_layer_name", None)  # with the `kernels` package: an nn.Module wrapper
    if isinstance(name, str):
        return name
    if inspect.isfunction(obj) and hasattr(obj, "__wrapped__"):
        closure = inspect.getclosurevars(obj).nonlocals
        if closure.get("package") == "fla" and isinstance(closure.get("func_name"), str):
            return closure["func_name"]
    return None


class _Adapter:
    """Callable standing in for one dispatch point: fla-compatible call in, dynts op out."""

    def __init__(self, hub_name: str, op: Callable):
        self.hub_name = hub_name
        self.op = op
        self.parameters = set(inspect.signature(op).parameters)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        for option, default in _FLA_OPTION_DEFAULTS.items():
            if option not in kwargs:
                continue
            value = kwargs[option]
            if (value is not None) if default is None else (value != default):
                raise NotImplementedError(
                    f"dynts's {self.hub_name} supports only {option}={default!r}, got {value!r}; disable the dynts "
                    "linear-attention backend for this model"
                )
        self.calls += 1
        return self.op(*args, **{key: value for key, value in kwargs.items() if key in self.parameters})


class LinearAttentionBackend:
    """Handle returned by ``use_dynts_linear_attention``: what it serves, and how to switch it off."""

    def __init__(self, patches: list[tuple[ModuleType, str, object, _Adapter]]):
        self._patches = patches

    @property
    def served(self) -> dict[str, _Adapter]:
        """``"module.attribute"`` -> adapter (with its ``hub_name`` and ``calls`` count) for each patched point."""
        return {f"{module.__name__}.{attribute}": adapter for module, attribute, _, adapter in self._patches}

    def disable(self) -> None:
        """Put transformers' original dispatch points back."""
        for module, attribute, original, adapter in reversed(self._patches):
            if getattr(module, attribute) is adapter:
                setattr(module, attribute, original)
        self._patches = []

    def __enter__(self) -> LinearAttentionBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.disable()


def find_dispatch_points(model: torch.nn.Module) -> list[tuple[ModuleType, str, str]]:
    """(modeling module, attribute, hub function name) of each KDA / Gated DeltaNet dispatch point of ``model``."""
    modules = {sys.modules[type(module).__module__] for module in model.modules()}
    points = []
    for module in sorted(modules, key=lambda m: m.__name__):
        for attribute, obj in list(vars(module).items()):
            if isinstance(obj, _Adapter):
                raise ValueError(f"the dynts linear-attention backend is already on for {module.__name__}; "
                                 "disable the earlier handle first")
            hub_name = _hub_function_name(obj)
            if hub_name in SERVED_OPS:
                points.append((module, attribute, hub_name))
    return points


def use_dynts_linear_attention(model: torch.nn.Module) -> LinearAttentionBackend:
    """Route ``model``'s KDA / Gated DeltaNet calls to dynts's kernels; returns a handle (also a context manager).

    Raises ValueError if none of the model's modeling modules has such a dispatch point, or if the backend is
    already on for them (one handle owns each switch). Takes precedence over fla when fla is installed.
    """
    patches = []
    for module, attribute, hub_name in find_dispatch_points(model):
        patches.append((module, attribute, getattr(module, attribute), _Adapter(hub_name, SERVED_OPS[hub_name])))
    if not patches:
        raise ValueError(f"{type(model).__name__} has no transformers linear-attention dispatch point "
                         f"({', '.join(SERVED_OPS)}); nothing for the dynts backend to serve")
    for module, attribute, _, adapter in patches:
        setattr(module, attribute, adapter)
    return LinearAttentionBackend(patches)
