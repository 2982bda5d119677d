"""HF transformers integration: ``DynTSCache``, a ``transformers.Cache`` that keeps the KV cache within a budget.

    cache = DynTSCache(model, CompressionConfig(budget=3000, window=1000), scorer="h2o")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=16384)

This module only adapts the model to ``dynts.compressor.DenseCompressor`` (which owns storage, scoring and
policy), through hooks and the ``Cache`` API; the model is not patched:

* a forward pre-hook on the decoder announces each step and, once rows are no longer aligned (padding dropped,
  tokens evicted, finished rows), replaces the 2D padding mask by a 4D additive mask over physical slots;
* each full-attention layer's ``update`` writes into the preallocated storage (``DynTSLayer``);
* for scorers that need queries, hooks on the attention module and its query projection capture the post-RoPE
  queries of the step;
* a forward hook on the decoder hands the final-norm hidden states to the scorer and compacts full rows;
* each ``generate`` call marks the cache as user-defined (``_is_user_defined``) before its first forward pass: at that
  moment the cache reads the call's EOS and pad ids and the length of its input from the calling frames of
  transformers' ``generate`` (5.17-5.19), so that rows finish exactly when ``generate`` finishes them, the whole input
  (chunked prefill included) is protected as the prompt, and a second call on the same cache continues every row.

Positions stay logical: ``get_seq_length`` is the logical length, so RoPE positions are those of the full cache.
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..compressor import DenseCompressor
from ..config import CompressionConfig, check_int, check_token_ids
from ..modeling import attention_modules, decoder_module
from ..scorers import Scorer, get_scorer

_UNSUPPORTED_LAYER_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding")


class DynTSLayer(CacheLayerMixin):
    """The cache of one full-attention layer: a view into the shared storage of its ``DynTSCache``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "DynTSCache", storage_layer: int) -> None:
        # CacheLayerMixin.__init__ would assign keys/values tensors; this layer exposes them as views instead.
        self._owner = weakref.proxy(owner)
        self.storage_layer = storage_layer

    def __repr__(self) -> str:
        return f"DynTSLayer(storage_layer={self.storage_layer})"

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self._owner.compressor.kv is not None

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        kv = self._owner.compressor.kv
        return None if kv is None else kv.keys[self.storage_layer, :, :, : self._owner.compressor.max_physical_len]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        kv = self._owner.compressor.kv
        return None if kv is None else kv.values[self.storage_layer, :, :, : self._owner.compressor.max_physical_len]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is allocated by the compressor on the first write."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner.compressor.write(self.storage_layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.compressor.max_physical_len + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.compressor.logical_len

    def get_max_length(self) -> int:
        return -1

    def _unsupported(self, what: str) -> None:
        raise NotImplementedError(f"DynTSCache does not support {what} (use greedy or sampling generation)")

    def reset(self) -> None:
        self._unsupported("reset; create a new DynTSCache per generate call")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("beam search")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping (assisted / speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("expanding a filled cache (num_return_sequences on a reused cache)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("selecting batch rows of a filled cache")


class DynTSCache(Cache):
    """A bounded KV cache for ``model.generate(..., past_key_values=DynTSCache(model, config, scorer=...))``.

    model:         an HF causal LM (Llama, Qwen2, Qwen3, Mistral and other decoders with full-attention layers;
                   linear-attention layers of hybrid models keep HF's own cache layers, untouched).
    config:        a ``CompressionConfig``.
    scorer:        a ``Scorer`` instance or a name from ``dynts.scorers.SCORERS`` (built with ``scorer_kwargs``).
    eos_token_id:  inside ``generate`` the cache follows the call's own EOS ids (a row finishes when ``generate``
                   finishes it); given here, it must equal them (a mismatch is an error at the call's start). Outside
                   ``generate`` (a loop over the model's forward) these ids finish rows; None: rows never finish.
    pad_token_id:  outside ``generate``, the token a finished row must be fed (inside, ``generate``'s).
    history_limit: steps of per-row physical lengths kept in ``stats.history`` (a ring).

    Supports ``sdpa`` and ``eager`` attention, greedy and sampling, padding anywhere in the input (left padding,
    or padding between turns), and several ``generate`` calls on one cache (multi-turn): each call's input is
    protected like a prompt and rows that finished an earlier call continue. Gradients do not flow into cached K/V.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CompressionConfig,
        scorer: Scorer | str = "h2o",
        *,
        scorer_kwargs: dict[str, Any] | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        history_limit: int = 4096,
    ) -> None:
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        if isinstance(scorer, str):
            if scorer_kwargs is not None and not isinstance(scorer_kwargs, dict):
                raise TypeError(f"scorer_kwargs must be a dict, got {type(scorer_kwargs).__name__}")
            scorer = get_scorer(scorer, **(scorer_kwargs or {}))
        elif scorer_kwargs:
            raise ValueError("scorer_kwargs is only used with a scorer name")
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a Scorer or a scorer name, got {type(scorer).__name__}")
        scorer.validate(config)
        self._eos_token_ids = None if eos_token_id is None else check_token_ids("eos_token_id", eos_token_id)
        pad_token_id = None if pad_token_id is None else check_int("pad_token_id", pad_token_id, minimum=0)
        text_config = model.config.get_text_config(decoder=True)
        config.validate_vocab(text_config.vocab_size)
        attn_implementation = getattr(text_config, "_attn_implementation", None)
        if attn_implementation not in (None, "sdpa", "eager"):
            raise ValueError(
                f"DynTSCache supports attn_implementation 'sdpa' or 'eager' (it passes a 4D mask over physical slots); "
                f"the model uses {attn_implementation!r}"
            )

        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        if isinstance(layer_kwargs, dict):  # transformers < 5.19: one kwargs dict shared by every layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        layers: list[Any] = []
        self.storage_layer_of: dict[int, int] = {}
        for layer_idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if layer_type == "full_attention":
                self.storage_layer_of[layer_idx] = len(self.storage_layer_of)
                layers.append(DynTSLayer(self, self.storage_layer_of[layer_idx]))
            elif layer_type in _UNSUPPORTED_LAYER_TYPES:
                raise ValueError(
                    f"layer {layer_idx} is {layer_type!r}: DynTSCache compresses full-attention layers only "
                    "(sliding-window layers are not supported yet)"
                )
            else:  # linear attention / conv state of hybrid models: HF's own layer, never touched by dynts
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        if not self.storage_layer_of:
            raise ValueError("the model has no full-attention layer to compress")
        super().__init__(layers=layers)

        self.config = config
        self.scorer = scorer
        attention = attention_modules(model, set(self.storage_layer_of))
        first = attention.get(min(self.storage_layer_of))
        self.compressor = DenseCompressor(
            config, scorer, num_layers=len(self.storage_layer_of),
            query_heads=getattr(text_config, "num_attention_heads", None),
            scale=getattr(first, "scaling", None),
            eos_token_ids=self._eos_token_ids or (), pad_token_id=pad_token_id, history_limit=history_limit,
        )
        self._model_dtype = next(model.parameters()).dtype
        self._in_forward = False
        self._user_defined = False
        self._queries: dict[int, torch.Tensor] = {}
        self._hooks = self._install_hooks(model, attention)
        weakref.finalize(self, _remove_hooks, self._hooks)

    # ------------------------------------------------------------------ generation calls
    def start_call(self, input_len: int, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> None:
        """Announce a generation call by a loop of your own (``generate`` does this itself): its input is the
        sequence's first ``input_len`` columns (the ones not yet fed are protected as its prompt), rows finish on
        ``eos_token_id`` and must then be fed ``pad_token_id``."""
        input_len = check_int("input_len", input_len, minimum=0)
        eos = () if eos_token_id is None else check_token_ids("eos_token_id", eos_token_id)
        pad = None if pad_token_id is None else check_int("pad_token_id", pad_token_id, minimum=0)
        self.compressor.start_call(input_len, eos, pad)

    @property
    def eos_token_ids(self) -> tuple[int, ...] | None:
        """The EOS ids given to this cache (None: it follows each generate call's)."""
        return self._eos_token_ids

    @property
    def _is_user_defined(self) -> bool:
        return self._user_defined

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # transformers' generate sets this on a cache it was given, once per call, before the first forward pass.
        self._user_defined = value
        if value:
            eos, pad, input_len = _generate_call_settings(sys._getframe(1))
            if self._eos_token_ids is not None and set(self._eos_token_ids) != set(eos):
                raise ValueError(
                    f"DynTSCache(eos_token_id={list(self._eos_token_ids)}) but this generate call stops rows on "
                    f"eos_token_id={list(eos) or None}: a row would finish in one and not the other. Drop the cache's "
                    "eos_token_id (it follows generate) or pass the same ids to both"
                )
            self.compressor.start_call(input_len, eos, pad)

    # ------------------------------------------------------------------ public introspection
    def resident_positions(self, layer_idx: int) -> list[torch.Tensor]:
        """For each row, the logical positions whose K/V the model layer ``layer_idx`` holds (in slot order).

        Positions are column indices of the generated sequence tensor (left padding included), so
        ``sequences[row, positions]`` are the kept tokens. Shape [n] per row, [kv_heads, n] for ``per_kv_head``.
        """
        if layer_idx not in self.storage_layer_of:
            raise ValueError(
                f"layer_idx {layer_idx} is not a compressed full-attention layer; allowed: {sorted(self.storage_layer_of)}"
            )
        return self.compressor.resident_positions(self.storage_layer_of[layer_idx])

    @property
    def physical_len(self) -> list[int]:
        """Per row, the number of tokens whose K/V are held."""
        slots = self.compressor.slots
        return [] if slots is None else list(slots.physical_len_host)

    @property
    def stats(self):  # -> CacheStats
        return self.compressor.stats

    def detach(self) -> None:
        """Remove the hooks from the model now (they are also removed when the cache is garbage collected)."""
        _remove_hooks(self._hooks)

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self, model: nn.Module, attention: dict[int, nn.Module]) -> list[Any]:
        decoder = decoder_module(model)
        ref = weakref.ref(self)
        handles = [
            decoder.register_forward_pre_hook(lambda m, a, k: _before_forward(ref, a, k), with_kwargs=True),
            decoder.register_forward_hook(lambda m, a, k, out: _after_forward(ref, k, out), with_kwargs=True),
        ]
        if self.scorer.needs_queries:
            for layer_idx, module in attention.items():
                handles.extend(_query_capture_hooks(ref, layer_idx, module))
        return handles


def _before_forward(ref: weakref.ref, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    cache = ref()
    if cache is None or kwargs.get("past_key_values") is not cache or cache.compressor.session is not None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    if reference is None:
        raise ValueError("DynTSCache: the forward pass got neither input_ids nor inputs_embeds")
    batch_size, num_new = reference.shape[0], reference.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("DynTSCache builds its own 4D attention mask; pass a 2D padding mask (or none)")
    compressor = cache.compressor
    compressor.begin_step(batch_size=batch_size, num_new=num_new, input_ids=input_ids, attention_mask=mask)
    cache._in_forward = True
    if not compressor.is_aligned():
        kwargs["attention_mask"] = compressor.attention_mask(cache._model_dtype)
    return args, kwargs


def _after_forward(ref: weakref.ref, kwargs: dict, output: Any) -> None:
    cache = ref()
    if cache is None or kwargs.get("past_key_values") is not cache or cache.compressor.session is not None:
        return
    cache._in_forward = False
    cache._queries.clear()
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, tuple):
        hidden = output[0]
    cache.compressor.end_step(hidden)


def _generate_call_settings(frame: types.FrameType | None) -> tuple[tuple[int, ...], int | None, int]:
    """(EOS ids, pad id, input length) of the ``generate`` call that is marking the cache as user-defined.

    The caller is transformers' ``_prepare_cache_for_generation(generation_config, ...)``, itself called by
    ``generate``, whose ``input_ids`` (or ``inputs_embeds``) hold the whole sequence the call was given.
    """
    config = None if frame is None else frame.f_locals.get("generation_config")
    outer = None if frame is None else frame.f_back
    input_ids = None if outer is None else outer.f_locals.get("input_ids")
    if config is None or not hasattr(config, "_eos_token_tensor") or not isinstance(input_ids, torch.Tensor):
        raise RuntimeError(
            "DynTSCache could not read the settings of the generate call that uses it (this transformers version "
            "calls the cache differently; supported: transformers >=5.17,<5.20)"
        )
    eos = config._eos_token_tensor
    eos_ids = () if eos is None else tuple(int(token) for token in eos.flatten().tolist())
    pad = config._pad_token_tensor
    pad_id = None if pad is None else int(pad.flatten()[0])
    input_len = input_ids.shape[1]
    embeds = outer.f_locals.get("model_kwargs", {}).get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        input_len = max(input_len, embeds.shape[1])
    return eos_ids, pad_id, input_len


def _query_capture_hooks(ref: weakref.ref, layer_idx: int, attention: nn.Module) -> list[Any]:
    """Hooks that rebuild the post-RoPE queries of ``attention`` from its own projections: the output of
    ``q_norm`` (Qwen3) or ``q_proj``, rotated with the cos/sin the module receives and its model's RoPE."""
    projection = getattr(attention, "q_norm", None) or getattr(attention, "q_proj", None)
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    head_dim = getattr(attention, "head_dim", None)
    if projection is None or rotary is None or head_dim is None:
        raise ValueError(
            f"{type(attention).__name__}: cannot capture queries (no q_proj/q_norm, head_dim or apply_rotary_pos_emb); "
            "use a scorer that needs no queries (external/predictor, window, streamingllm, sepllm, random)"
        )
    rotation: dict[str, Any] = {}

    def before_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = ref()
        if cache is not None and cache._in_forward:
            rotation["cos_sin"] = kwargs.get("position_embeddings")

    def after_projection(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cache = ref()
        if cache is None or not cache._in_forward:
            return
        batch, num_new = output.shape[0], output.shape[1]
        query = output.reshape(batch, num_new, -1, head_dim).transpose(1, 2)
        cos, sin = rotation["cos_sin"]
        cache._queries[layer_idx] = rotary(query, query, cos, sin)[0]

    def after_attention(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = ref()
        if cache is None or not cache._in_forward or layer_idx not in cache._queries:
            return
        cache.compressor.observe_queries(cache.storage_layer_of[layer_idx], cache._queries.pop(layer_idx))

    return [
        attention.register_forward_pre_hook(before_attention, with_kwargs=True),
        projection.register_forward_hook(after_projection),
        attention.register_forward_hook(after_attention, with_kwargs=True),
    ]


def _remove_hooks(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
