"""GPU decode benchmark: plain HF, the fast path with a full cache, and dynts, side by side at real shapes.

    python -m dynts.evals.bench_decode --models llama-8b qwen-7b --out results/

Random bf16 weights of the real architectures (speed does not depend on weight values), batch 20, generation forced
to a fixed length (the models have no EOS token), all paths in one process:

* **plain HF**: sdpa + DynamicCache, measured at each point on a cache filled to that many tokens (its step time
  depends only on the cache length; decoding 15k steps would take ~20 minutes).
* **full cache**: the fast path (``StaticDecoder``: the same CUDA graph, decode-attention kernel and predictor
  scorer as dynts) over a ``DynTSCache`` whose budget is above the last point, so it never evicts and its storage
  is as large as a real full-cache run's. Measured at each point on a cache prefilled with that many prompt tokens
  (its step time depends only on the tokens held; decoding 15k steps for real would cost more than the whole run).
* **dynts**: the fast path with eviction (budget 5000, window 2000, keep ratio 0.3 by default, predictor scorer),
  decoding for real from a 128-token prompt through the first compaction and one whole period of the saw-tooth
  after it (budget - compacted length steps, 2,100 by default), ~7,200 steps. Its held tokens repeat with that
  period from the first compaction on (every row grows by one token per step and is compacted to the same
  length), so a point the run does not reach is measured on the steps whole periods earlier, which hold the same
  tokens; the run checks the repetition on its own trace, and each row of the table says where it was measured.

``--static-steps`` chooses how the fast path runs a step: ``fused`` (``FusedDecodeStep``: a dozen fused launches
per layer), ``unfused`` (HF's modules with the ``dynts_decode`` attention), or both side by side (the default).

The host synchronises with the GPU only every ``readback_every`` (64) steps or when a compaction is due, as
``StaticDecoder`` does in real use; each step's time is the mean of its synchronisation interval
(``StaticDecoder.step_seconds``), and each step's held tokens come from the cache's own per-step record
(``cache.stats.history``). Nothing timed pays a compilation or a graph capture: a warm-up run per step kind whose
prompt nearly fills the budget compacts once at the benchmark's shapes (the compaction kernel compiles there, the
step's kernels at its capture), and the first synchronisation interval of every run (the capture) is left out.

Per point and step kind: ms/step of the three paths; dynts vs plain HF (the paper's ratio) and full cache / dynts
(what eviction alone buys); each path's bandwidth roofline ((weights + resident KV bytes) / measured copy bandwidth)
and step / roofline; peak allocator bytes while decoding (cache storage plus what the steps allocate on top, the
weights and prefill leftovers excluded); GFLOPs per step. Per model
and step kind: the scoring + eviction share of decode time and, per compaction, its synchronisation interval's time
per step over the intervals just before it, and its spike: the compaction step's time (the interval's steps plus
the excess of its synchronisation over theirs; a synchronisation lasts until the device has also run what it queued,
a compaction's K/V moves, timed by CUDA events) over an ordinary step's (``compaction_spikes``). JSON, a plot and a
markdown table (the README's) go to ``--out``; ``--replot JSON`` redraws the plot and table from a saved JSON (on a
machine without matplotlib the plot is skipped).

GPU time on an H200, per model, both step kinds: the full-cache points ~80 s (prefills of 2k-15k tokens x 20 rows
for each kind, ~95 GB at 15k for Llama-8B: an 80 GB card reports those points as out of memory), dynts ~130 s
(~7,200 steps per kind), plain HF ~15 s, warm-up ~20 s: about 4 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import CompressionConfig
from ..policy import compacted_length

POINTS = (2000, 5000, 7000, 10000, 12000, 15000)
PATHS = ("plain", "full", "dynts")
PATH_LABELS = {"plain": "plain HF (sdpa + DynamicCache)", "full": "full cache, fast path", "dynts": "dynts"}
STATIC_STEPS = ("fused", "unfused")  # StaticDecoder(fused=True) / (fused=False)
SPIKE_NEIGHBOURS = 3  # synchronisation intervals before a compaction's that its spike is measured against
READBACK_EVERY = 64  # StaticDecoder's default: the host synchronises at most this many steps apart


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self, element_size: int = 2) -> int:
        """K and V bytes of one token across all layers (one row)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * element_size


SHAPES = {
    "llama-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256),  # R1-Distill-Llama-8B
    "qwen-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064),  # R1-Distill-Qwen-7B
    "tiny": Shape("llama", 128, 2, 4, 2, 256, 512),  # a smoke test of the script itself (runs on CPU)
}


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures (``main`` builds it from the command line)."""

    models: tuple[str, ...] = ("llama-8b", "qwen-7b")
    batch_size: int = 20
    prompt_len: int = 128
    points: tuple[int, ...] = POINTS
    budget: int = 5000
    window: int = 2000
    keep_ratio: float = 0.3
    point_window: int = 100  # dynts steps averaged on each side of a point
    full_steps: int = 40  # timed steps of the full-cache fast path at each point
    plain_steps: int = 10  # timed steps of plain HF at each point
    static_steps: tuple[str, ...] = STATIC_STEPS  # how the fast path runs a step: fused, unfused or both
    device: str = "cuda"

    def __post_init__(self) -> None:
        unknown = [name for name in self.models if name not in SHAPES]
        if unknown:
            raise ValueError(f"models must be among {sorted(SHAPES)}, got {unknown}")
        for name in ("batch_size", "prompt_len", "point_window", "full_steps", "plain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.static_steps or len(set(self.static_steps)) != len(self.static_steps) or not set(
                self.static_steps) <= set(STATIC_STEPS):
            raise ValueError(f"static_steps must be distinct values among {STATIC_STEPS}, got "
                             f"{list(self.static_steps)}")
        if not self.points or min(self.points) <= self.prompt_len + self.point_window:
            raise ValueError(f"points must be > prompt_len + point_window = {self.prompt_len + self.point_window} "
                             f"(dynts is averaged over point_window steps on each side), got {list(self.points)}")
        if self.budget <= self.prompt_len + 4:
            raise ValueError(f"budget must be > prompt_len + 4 = {self.prompt_len + 4} (the protected prompt stays "
                             f"below it; the warm-up prompt is budget - 4 tokens), got {self.budget}")
        self.config  # noqa: B018  (building the CompressionConfig checks window and keep_ratio)

    @property
    def config(self) -> CompressionConfig:
        return CompressionConfig(budget=self.budget, window=self.window, keep_ratio=self.keep_ratio)

    @property
    def first_compaction_step(self) -> int:
        """The dynts step whose synchronisation compacts every row for the first time: the prompt plus the tokens
        fed reach the trigger."""
        return self.config.trigger - self.prompt_len - 1

    @property
    def period(self) -> int:
        """Steps from one compaction to the next after the first: the trigger less the compacted length (the
        protected prompt counts against the keep quota)."""
        config = self.config
        protected_older = min(self.prompt_len, config.trigger - config.window) if config.protect_prompt else 0
        return config.trigger - compacted_length(config, config.trigger, protected_older)

    @property
    def dynts_steps(self) -> int:
        """dynts decodes until the last point's averaging window is complete, or through the first compaction and
        one whole period after it (a window on each side) when that is shorter: later points repeat held counts."""
        to_last_point = max(self.points) - self.prompt_len + self.point_window
        one_period = self.first_compaction_step + 1 + self.period + 2 * self.point_window
        return min(to_last_point, one_period)

    def dynts_step_of(self, point: int) -> int:
        """The step of the dynts run measured for ``point``: the point's own step (it feeds the token at logical
        position ``point``) when the run reaches its window, else the step whole periods earlier."""
        step = point - self.prompt_len
        overshoot = step + self.point_window - self.dynts_steps
        return step if overshoot <= 0 else step - math.ceil(overshoot / self.period) * self.period

    @property
    def full_capacity(self) -> int:
        """Slots of the full-cache path's storage: what a real run up to the last point would allocate."""
        return max(self.points) + 2 * self.full_steps + 8


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _on_gpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def build_model(shape: Shape, device: str = "cuda") -> torch.nn.Module:
    """Random bf16 weights, allocated directly on the device; no EOS token (generation runs to its length)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn, vocab_size=shape.vocab,
                  max_position_embeddings=32768, tie_word_embeddings=False, eos_token_id=None)
    if shape.architecture == "llama":
        config, cls = LlamaConfig(**common, rope_theta=500000.0), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False), Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02)
    # Buffers computed at construction (RoPE frequencies) were not materialised from meta: rebuild them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    model.generation_config.eos_token_id = None
    return model.eval()


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (the roofline's unit)."""
    mib = 2048 if _on_gpu(device) else 64
    source = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    _sync(device)
    return 2 * source.numel() * 10 / (time.perf_counter() - start)


def step_costs(shape: Shape, batch: int, kv_tokens: float, weight_bytes: int, bandwidth: float) -> dict[str, float]:
    """FLOPs, KV bytes read and bandwidth roofline of one decode step at ``kv_tokens`` held tokens per row."""
    head_dim = shape.head_dim
    linear_params = shape.layers * (shape.hidden * head_dim * (shape.heads * 2 + shape.kv_heads * 2)
                                    + 3 * shape.hidden * shape.ffn) + shape.hidden * shape.vocab
    attention_flops = 4 * shape.layers * shape.heads * head_dim * kv_tokens
    kv_bytes = batch * kv_tokens * shape.kv_bytes_per_token()
    return {
        "gflops": batch * (2 * linear_params + attention_flops) / 1e9,
        "kv_bytes": kv_bytes,
        "roofline_ms": 1000 * (weight_bytes + kv_bytes) / bandwidth,
    }


class DecodeMemory:
    """Peak allocator bytes of a decode path: its cache storage plus the most its steps allocate on top (graph pool,
    activations, a DynamicCache's growth), measured from ``start`` (CUDA only). Weights and whatever a prefill
    left allocated are not counted: the full-cache path is prefilled to each point, which a real run is not."""

    def __init__(self, device: torch.device | str) -> None:
        self.enabled = _on_gpu(device)
        self.at_start = 0

    def start(self) -> None:
        if self.enabled:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()

    def peak(self, storage_bytes: int) -> int | None:
        return storage_bytes + torch.cuda.max_memory_allocated() - self.at_start if self.enabled else None


# ---------------------------------------------------------------------------------------------------- plain HF
@torch.no_grad()
def plain_point(model: torch.nn.Module, shape: Shape, batch: int, kv_tokens: int, steps: int) -> dict:
    """HF decode (sdpa + DynamicCache) on a cache filled with ``kv_tokens`` random tokens: ms per step (mean of
    ``steps`` after 3 untimed ones), peak allocator bytes (``DecodeMemory``)."""
    from transformers import DynamicCache

    device = model.device
    memory = DecodeMemory(device)
    cache = DynamicCache(config=model.config)
    for layer in range(shape.layers):
        keys = torch.randn(batch, shape.kv_heads, kv_tokens, shape.head_dim, dtype=model.dtype, device=device)
        cache.update(keys, keys.clone(), layer)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    ids = torch.randint(0, shape.vocab, (batch, 1), device=device)
    mask = torch.ones(batch, kv_tokens + 1, dtype=torch.long, device=device)
    memory.start()
    times = []
    for step in range(steps + 3):
        position = torch.full((batch, 1), kv_tokens + step, device=device)
        _sync(device)
        start = time.perf_counter()
        logits = model(ids, attention_mask=mask, position_ids=position, past_key_values=cache, logits_to_keep=1).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        mask = torch.cat([mask, mask[:, :1]], dim=1)
    peak = memory.peak(cache_bytes)  # the cache's growth over the steps is in what they allocated
    del cache, logits
    if _on_gpu(device):
        torch.cuda.empty_cache()
    # Step s (from 0) reads the kv_tokens filled, the s fed before it and its own.
    held = [kv_tokens + step + 1 for step in range(3, steps + 3)]
    return {"ms": 1000 * sum(times[3:]) / steps, "held_tokens": sum(held) / steps, "peak_bytes": peak}


# ---------------------------------------------------------------------------------------------------- fast path
def predictor_scorer(model: torch.nn.Module):
    """The learned Importance Predictor's scorer with a randomly initialised head (speed only)."""
    from ..predictor import ImportancePredictor, PredictorScorer

    return PredictorScorer(ImportancePredictor.for_model(model))


@torch.no_grad()
def static_run(model: torch.nn.Module, shape: Shape, batch: int, prompt_len: int, new_tokens: int,
               config: CompressionConfig, *, fused: bool, readback_every: int = READBACK_EVERY) -> dict:
    """``StaticDecoder`` (``fused`` step or HF's modules) over a fresh ``DynTSCache`` (predictor scorer) from a
    random prompt, ``new_tokens`` decode steps, the host synchronising as in real use. Returns each step's wall time
    (its synchronisation interval's mean) and the intervals, each row's physical length before each step
    (``held_before``, the tokens the step's attention reads besides its own) and after the last one, the peak
    allocator bytes while decoding (``DecodeMemory``), and the cache's scoring / eviction seconds."""
    from ..integrations.hf import DynTSCache
    from ..integrations.hf_static import StaticDecoder

    device = model.device
    memory = DecodeMemory(device)
    # The cache records every row's length after each forward pass: the prefill, then each step.
    cache = DynTSCache(model, config, scorer=predictor_scorer(model), history_limit=new_tokens + 8)
    decoder = StaticDecoder(model, cache, fused=fused)
    prompt = torch.randint(0, shape.vocab, (batch, prompt_len), device=device)
    started = []

    def start_memory(logits: torch.Tensor) -> None:
        # First called with the prefill's logits: decoding starts. Later calls return at once (no device work,
        # nothing read back), so the host still runs ahead of the steps as it does without a callback.
        if not started:
            started.append(True)
            memory.start()

    # max_new_tokens counts the token the prefill chooses.
    decoder.generate(prompt, max_new_tokens=new_tokens + 1, readback_every=readback_every, logits_callback=start_memory)
    stats = cache.stats
    held = list(stats.history)
    if len(held) != new_tokens + 1:
        raise RuntimeError(f"the cache recorded {len(held)} passes, expected the prefill and {new_tokens} steps")
    run = {
        "step_seconds": list(decoder.step_seconds),
        "sync_intervals": list(decoder.sync_intervals),
        "sync_seconds": list(decoder.sync_seconds),
        "held_before": held[:-1],
        "held_after_last": held[-1],
        "peak_bytes": memory.peak(stats.allocated_kv_bytes),
        "allocated_kv_bytes": stats.allocated_kv_bytes,
        "scoring_seconds": stats.scoring_seconds,
        "eviction_seconds": stats.eviction_seconds,
    }
    del decoder, cache
    gc.collect()  # the cache's hooks on the model go with it
    if _on_gpu(device):
        torch.cuda.empty_cache()
    return run


def warm_up(model: torch.nn.Module, shape: Shape, batch: int, config: CompressionConfig, *, fused: bool) -> int:
    """Compile every kernel of a dynts run at its own shapes, untimed: a prompt of ``budget - 4`` tokens (not
    protected, so its tokens can be evicted) reaches the budget at the 4th step and is compacted with the real
    keep count, capacity and batch. Returns how many of its steps compacted (0: nothing was warmed)."""
    run = static_run(model, shape, batch, config.budget - 4, 12, replace(config, protect_prompt=False), fused=fused)
    return len(compaction_steps(run["held_before"] + [run["held_after_last"]]))


def full_cache_point(model: torch.nn.Module, shape: Shape, settings: Settings, point: int, *, fused: bool) -> dict:
    """The fast path over a cache that never evicts, prefilled with ``point`` tokens: two synchronisation intervals
    of ``full_steps`` steps, the first (graph capture) discarded: ms per step, mean held tokens, peak allocator
    bytes."""
    config = CompressionConfig(budget=settings.full_capacity, window=0, keep_ratio=1.0)
    try:
        run = static_run(model, shape, settings.batch_size, point, 2 * settings.full_steps, config, fused=fused,
                         readback_every=settings.full_steps)
    except torch.OutOfMemoryError:  # the prefill of a long point on a smaller card: report it, keep going
        gc.collect()
        torch.cuda.empty_cache()
        return {"ms": None, "held_tokens": point, "peak_bytes": None}
    first = run["sync_intervals"][0]
    timed = run["step_seconds"][first:]
    held = [before[0] + 1 for before in run["held_before"][first:]]
    return {"ms": 1000 * sum(timed) / len(timed), "held_tokens": sum(held) / len(held), "peak_bytes": run["peak_bytes"]}


@torch.no_grad()
def predictor_ms(model: torch.nn.Module, batch: int, repeats: int = 200) -> float:
    """Time of the predictor head on one step's hidden states as it runs in the fast path: inside the captured
    decode step (a CUDA graph of ``repeats`` head calls on a GPU; eager elsewhere), where the cache's stopwatch
    cannot see it."""
    scorer = predictor_scorer(model)
    head = scorer.head.to(model.device)
    head.hidden_layers.to(model.dtype)
    hidden = torch.randn(batch, 1, model.config.hidden_size, device=model.device, dtype=model.dtype)

    def run() -> None:
        for _ in range(repeats):
            head(hidden)

    if _on_gpu(model.device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            head(hidden)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    run()
    _sync(model.device)
    start = time.perf_counter()
    run()
    _sync(model.device)
    return 1000 * (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------------------------------------------- dynts run
def compaction_steps(held: list[list[int]]) -> list[int]:
    """Steps whose host bookkeeping compacted some row: ``held[s + 1]`` (lengths after step s) drops below
    ``held[s]`` (lengths before it) for at least one row."""
    return [step for step in range(len(held) - 1)
            if any(after < before for before, after in zip(held[step], held[step + 1]))]


def compaction_spikes(step_seconds: list[float], sync_intervals: list[int], sync_seconds: list[float],
                      steps: list[int]) -> list[dict]:
    """Each compaction against the steps just before it. A compaction runs in the host synchronisation that ends
    its interval (``StaticDecoder.sync_intervals`` / ``sync_seconds``). Its neighbours are the
    ``SPIKE_NEIGHBOURS`` intervals before it that compacted nothing (not the first, which captured the graph, and
    none after it: after a compaction the rows hold far fewer tokens, so those steps are cheaper). Per compaction:

    * ``interval_ratio``: its interval's time per step over the neighbours' median (the compaction spread over
      the interval, as the host sees it);
    * ``spike``: the compaction step's time over an ordinary step's at the same held tokens: the interval's steps
      without their synchronisation, per step, plus the excess of its synchronisation (planning, read-back and the
      K/V moves it queued) over the neighbours' median one (what the compaction itself added)."""
    bounds, first = [], 0
    for count in sync_intervals:
        bounds.append((first, first + count))
        first += count
    interval_of = {step: index for index, (begin, end) in enumerate(bounds) for step in steps if begin <= step < end}
    compacting = set(interval_of.values())
    spikes = []
    for step in steps:
        index = interval_of.get(step)
        if index is None or index == 0:  # past the recorded steps, or in the capture's interval
            continue
        neighbours = [i for i in range(max(1, index - SPIKE_NEIGHBOURS), index) if i not in compacting]
        if not neighbours:
            continue
        begin, end = bounds[index]
        count = end - begin
        interval_seconds = step_seconds[begin] * count
        neighbour_step = statistics.median(step_seconds[bounds[i][0]] for i in neighbours)  # per-step means
        neighbour_sync = statistics.median(sync_seconds[i] for i in neighbours)
        own_step = (interval_seconds - sync_seconds[index]) / count
        compaction = sync_seconds[index] - neighbour_sync
        spikes.append({"step": step, "interval_steps": count, "interval_ms": 1000 * interval_seconds,
                       "interval_ratio": interval_seconds / count / neighbour_step,
                       "step_ms": 1000 * own_step, "compaction_ms": 1000 * compaction,
                       "spike": (own_step + compaction) / own_step})
    return spikes


def check_periodic(held: list[list[int]], settings: Settings) -> None:
    """The held tokens of a run shorter than the last point must repeat every ``period`` steps from the first
    compaction on (so that later points can be measured whole periods earlier): checked over every step the run
    holds twice."""
    first, period = settings.first_compaction_step, settings.period
    steps = compaction_steps(held)
    repeats = all(held[step] == held[step - period] for step in range(first + 1 + period, len(held)))
    if not steps or steps[0] != first or not repeats:
        raise RuntimeError(
            f"dynts's held tokens do not repeat every {period} steps from the first compaction at step {first} "
            f"(compactions at steps {steps[:4]}): points past the run's {len(held) - 1} steps cannot be measured on "
            "earlier steps")


def dynts_run(model: torch.nn.Module, shape: Shape, settings: Settings, *, fused: bool) -> dict:
    """dynts for real through the first compaction and one period after it (or to the last point): per-step times
    and held tokens, compactions and their spikes, scoring + eviction share of decode time, peak allocator bytes."""
    run = static_run(model, shape, settings.batch_size, settings.prompt_len, settings.dynts_steps, settings.config,
                     fused=fused)
    held = run["held_before"] + [run["held_after_last"]]
    if any(settings.dynts_step_of(point) != point - settings.prompt_len for point in settings.points):
        check_periodic(held, settings)
    steps = compaction_steps(held)
    rows_compacted = sum(after < before for step in steps for before, after in zip(held[step], held[step + 1]))
    step_seconds = run["step_seconds"]
    # The first synchronisation interval captures the CUDA graph: it is left out of the decode time.
    capture = run["sync_intervals"][0]
    total = sum(step_seconds[capture:])
    predictor = predictor_ms(model, settings.batch_size)
    predictor_seconds = predictor * (len(step_seconds) - capture) / 1000
    overhead = run["scoring_seconds"] + run["eviction_seconds"] + predictor_seconds
    spikes = compaction_spikes(step_seconds, run["sync_intervals"], run["sync_seconds"], steps)
    return {
        "step_ms": [1000 * s for s in step_seconds],
        "sync_intervals": run["sync_intervals"],
        "sync_ms": [1000 * s for s in run["sync_seconds"]],
        "held_row0": [before[0] for before in run["held_before"]],  # tokens held before each step (row 0)
        "compaction_steps": steps,
        "row_compactions": rows_compacted,
        "eviction_points": [{"logical": settings.prompt_len + step + 1, "held": held[step + 1][0],
                             "kv_ratio": held[step + 1][0] / (settings.prompt_len + step + 1)} for step in steps],
        "spikes": spikes,
        "max_spike": max((spike["spike"] for spike in spikes), default=None),
        "max_interval_ratio": max((spike["interval_ratio"] for spike in spikes), default=None),
        "peak_bytes": run["peak_bytes"],
        "allocated_kv_bytes": run["allocated_kv_bytes"],
        "scoring_seconds": run["scoring_seconds"],
        "eviction_seconds": run["eviction_seconds"],
        "predictor_ms_per_step": predictor,
        "decode_seconds": total,
        "scoring_and_eviction_share": overhead / total,
    }


def dynts_at(run: dict, settings: Settings, point: int) -> dict:
    """dynts at ``point`` (logical length): mean step time and mean tokens read over +-``point_window`` steps
    around the step measured for it (``Settings.dynts_step_of``), and the logical position of that step."""
    step = settings.dynts_step_of(point)
    window = slice(max(0, step - settings.point_window), min(len(run["step_ms"]), step + settings.point_window))
    step_ms = run["step_ms"][window]
    held = [tokens + 1 for tokens in run["held_row0"][window]]
    return {"ms": sum(step_ms) / len(step_ms), "held_tokens": sum(held) / len(held), "peak_bytes": run["peak_bytes"],
            "measured_at": settings.prompt_len + step}


# ---------------------------------------------------------------------------------------------------- one model
def measure_model(name: str, settings: Settings, bandwidth: float) -> tuple[list[dict], dict]:
    """All three paths for one model, the fast path with each step kind of ``settings.static_steps``: per-point
    rows (one per step kind) and the per-model record (a dynts run per step kind)."""
    shape = SHAPES[name]
    model = build_model(shape, settings.device)
    weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n)
    kinds = settings.static_steps
    for kind in kinds:
        warmed = warm_up(model, shape, settings.batch_size, settings.config, fused=kind == "fused")
        print(f"{name}: warm-up of the {kind} step ran {warmed} compaction step(s)", flush=True)
        if warmed == 0:
            raise RuntimeError("the warm-up run compacted nothing: the compaction kernel would compile in the timed "
                               "run")
    plain: dict[int, dict] = {}
    full: dict[str, dict[int, dict]] = {kind: {} for kind in kinds}
    for point in settings.points:
        plain[point] = plain_point(model, shape, settings.batch_size, point, settings.plain_steps)
        line = [f"{name} at {point}: plain HF {plain[point]['ms']:.2f} ms/step"]
        for kind in kinds:  # the kinds alternate point by point: a drift of the GPU's clock affects both alike
            full[kind][point] = full_cache_point(model, shape, settings, point, fused=kind == "fused")
            full_ms = full[kind][point]["ms"]
            line.append(f"full cache, {kind} step {'out of memory' if full_ms is None else f'{full_ms:.2f} ms/step'}")
        print(", ".join(line), flush=True)
    runs = {}
    for kind in kinds:
        run = runs[kind] = dynts_run(model, shape, settings, fused=kind == "fused")
        print(f"{name} dynts, {kind} step: {len(run['step_ms'])} steps in {run['decode_seconds']:.1f} s (graph "
              f"capture excluded), {run['row_compactions']} row compactions; scoring {run['scoring_seconds']:.2f} s "
              f"+ eviction {run['eviction_seconds']:.2f} s + predictor {run['predictor_ms_per_step']:.3f} ms/step = "
              f"{100 * run['scoring_and_eviction_share']:.2f}% of decode time; largest compaction spike "
              f"{_fmt(run['max_spike'], '.2f')}x an ordinary step (its interval: "
              f"{_fmt(run['max_interval_ratio'], '.3f')}x the ones before it)", flush=True)
    for point in runs[kinds[0]]["eviction_points"]:
        print(f"{name} eviction at logical {point['logical']}: holds {point['held']} tokens per row "
              f"= {point['kv_ratio']:.3f}x of a full cache", flush=True)
    rows = []
    for point in settings.points:
        for kind in kinds:
            dynts = dynts_at(runs[kind], settings, point)
            row = {"model": name, "point": point, "step": kind, "dynts_measured_at": dynts["measured_at"]}
            for path, figure in (("plain", plain[point]), ("full", full[kind][point]), ("dynts", dynts)):
                cost = step_costs(shape, settings.batch_size, figure["held_tokens"], weight_bytes, bandwidth)
                ms = figure["ms"]
                row.update({
                    f"{path}_ms": ms,
                    f"{path}_tokens_per_s": None if ms is None else 1000 * settings.batch_size / ms,
                    f"{path}_held_tokens": figure["held_tokens"],
                    f"{path}_kv_bytes": cost["kv_bytes"],
                    f"{path}_gflops": cost["gflops"],
                    f"{path}_roofline_ms": cost["roofline_ms"],
                    f"{path}_over_roofline": None if ms is None else ms / cost["roofline_ms"],
                    f"{path}_peak_bytes": figure["peak_bytes"],
                })
            row["dynts_vs_plain"] = row["plain_ms"] / row["dynts_ms"]
            row["eviction_buys"] = None if row["full_ms"] is None else row["full_ms"] / row["dynts_ms"]
            row["kv_held_ratio"] = row["dynts_kv_bytes"] / row["full_kv_bytes"]
            rows.append(row)
    record = {"weight_bytes": weight_bytes, "kv_bytes_per_token_row": shape.kv_bytes_per_token(), "dynts_runs": runs}
    del model
    if _on_gpu(settings.device):
        torch.cuda.empty_cache()
    return rows, record


def run_benchmark(settings: Settings, out: Path) -> dict:
    """Every model of ``settings``; writes JSON, markdown and plot to ``out`` after each model (a run cut short
    keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(settings.device)
    print(f"device copy bandwidth (read + write): {bandwidth / 1e12:.3f} TB/s", flush=True)
    results = {"device": torch.cuda.get_device_name() if _on_gpu(settings.device) else "cpu",
               "copy_bandwidth_bytes_per_s": bandwidth,
               "settings": settings.__dict__ | {"config": repr(settings.config)}, "rows": [], "runs": {}}
    for name in settings.models:
        rows, record = measure_model(name, settings, bandwidth)
        results["rows"].extend(rows)
        results["runs"][name] = record
        write_outputs(results, out)
    print(markdown_table(results["rows"]), flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- outputs
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one line per model, point and step kind of the fast path. A dynts figure measured on
    steps whole periods before its point (``dynts_measured_at``) is marked with *."""
    lines = [
        "| model | decode step | fast-path step | ms/step: plain HF / full cache / dynts | dynts vs plain HF | "
        "eviction buys (full / dynts) | KV held dynts / full | step / roofline: HF, full, dynts | peak allocated GB: "
        "HF, full, dynts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mapped = "*" if r["dynts_measured_at"] != r["point"] else ""
        lines.append(
            f"| {r['model']} | {r['point']:,} | {r['step']} | {_fmt(r['plain_ms'], '.1f')} / "
            f"{_fmt(r['full_ms'], '.2f')} / {_fmt(r['dynts_ms'], '.2f')}{mapped} | "
            f"{_fmt(r['dynts_vs_plain'], '.2f')}x | {_fmt(r['eviction_buys'], '.2f')}x | {r['kv_held_ratio']:.2f}x | "
            f"{_fmt(r['plain_over_roofline'], '.2f')}, {_fmt(r['full_over_roofline'], '.2f')}, "
            f"{_fmt(r['dynts_over_roofline'], '.2f')} | "
            f"{_gb(r['plain_peak_bytes'])}, {_gb(r['full_peak_bytes'])}, "
            f"{_gb(r['dynts_peak_bytes'])} |")
    measured_earlier = sorted({(r["point"], r["dynts_measured_at"]) for r in rows
                               if r["dynts_measured_at"] != r["point"]})
    if measured_earlier:
        lines.append("\n\\* dynts measured on the steps around logical position "
                     + ", ".join(f"{at:,} for {point:,}" for point, at in measured_earlier)
                     + " (whole periods of its saw-tooth earlier: the same held tokens)")
    return "\n".join(lines)


def model_summary(name: str, record: dict) -> str:
    lines = []
    for kind, run in record["dynts_runs"].items():
        lines.append(
            f"- {name}, {kind} step: scoring + eviction {100 * run['scoring_and_eviction_share']:.2f}% of decode time; "
            f"{run['row_compactions']} row compactions at {len(run['compaction_steps'])} steps, largest compaction "
            f"spike {_fmt(run['max_spike'], '.2f')}x an ordinary step (its synchronisation interval "
            f"{_fmt(run['max_interval_ratio'], '.3f')}x the ones before it, per step)")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("ms", "ms / step"), ("over_roofline", "step / bandwidth roofline"), ("kv_bytes", "KV bytes read / step"),
              ("peak_bytes", "peak allocated bytes (cache + decode steps)"))
    figure, axes = plt.subplots(len(models), len(panels) + 1, figsize=(5 * (len(panels) + 1), 4 * len(models)),
                                squeeze=False)
    for row_axes, name in zip(axes, models):
        mine = [r for r in rows if r["model"] == name]
        kinds = list(dict.fromkeys(r["step"] for r in mine))
        for axis, (key, label) in zip(row_axes, panels):
            for decode_path, marker in zip(PATHS, "o^s"):
                # plain HF has no fast-path step: drawn once
                for kind, style in zip(kinds[:1] if decode_path == "plain" else kinds, ("-", "--")):
                    lines = [r for r in mine if r["step"] == kind]
                    values = [r[f"{decode_path}_{key}"] for r in lines]
                    if any(v is not None for v in values):  # peak bytes exist on CUDA only
                        axis.plot([r["point"] for r in lines], [float("nan") if v is None else v for v in values],
                                  marker + style, label=PATH_LABELS[decode_path] + (
                                      "" if decode_path == "plain" else f", {kind} step"))
            axis.set_xlabel("decoding step (logical tokens)")
            axis.set_title(f"{name}: {label}")
            if axis.lines:
                axis.legend(fontsize=7)
        for r in mine:  # the two ratios on the step-time panel
            if r["step"] == kinds[0]:
                row_axes[0].annotate(f"{_fmt(r['dynts_vs_plain'], '.1f')}x HF, {_fmt(r['eviction_buys'], '.2f')}x full",
                                     (r["point"], r["dynts_ms"]), textcoords="offset points", xytext=(0, -14),
                                     fontsize=7)
        trace = row_axes[-1]
        for kind, run in results["runs"][name]["dynts_runs"].items():
            trace.plot(range(len(run["step_ms"])), run["step_ms"], lw=0.7, label=f"dynts, {kind} step")
            compacting = run["compaction_steps"]
            trace.plot(compacting, [run["step_ms"][s] for s in compacting], "rx")
        all_ms = [ms for run in results["runs"][name]["dynts_runs"].values() for ms in run["step_ms"]]
        trace.set_ylim(0, 3 * statistics.median(all_ms))
        trace.set_xlabel("decode step (x: its synchronisation compacted)")
        trace.set_title(f"{name}: dynts ms / step (interval means)")
        trace.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_outputs(results: dict, out: Path) -> None:
    """JSON (everything), markdown (the table and per-model lines) and, when matplotlib is installed, the plot."""
    (out / "bench_decode.json").write_text(json.dumps(results, indent=1))
    summary = [model_summary(name, record) for name, record in results["runs"].items()]
    (out / "bench_decode.md").write_text(markdown_table(results["rows"]) + "\n\n" + "\n".join(summary) + "\n")
    try:
        plot(results, out / "bench_decode.png")
    except ImportError:
        print("matplotlib is not installed: no plot (redraw it elsewhere with --replot bench_decode.json)", flush=True)


# ---------------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import default_device, device_name, existing_file

    defaults = Settings()
    parser.add_argument("--models", nargs="+", default=list(defaults.models), choices=list(SHAPES),
                        help="architecture shapes to measure (random weights)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows decoded together")
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len, help="random prompt tokens per row")
    parser.add_argument("--points", type=int, nargs="+", default=list(defaults.points),
                        help="decoding steps (held tokens) at which both are measured")
    parser.add_argument("--budget", type=int, default=defaults.budget, help="dynts: compact a row at this many tokens")
    parser.add_argument("--window", type=int, default=defaults.window, help="dynts: most recent tokens always kept")
    parser.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio, help="dynts: share of the older tokens kept")
    parser.add_argument("--point-window", type=int, default=defaults.point_window,
                        help="dynts steps averaged on each side of a point")
    parser.add_argument("--full-steps", type=int, default=defaults.full_steps,
                        help="timed steps of the full-cache fast path at each point")
    parser.add_argument("--plain-steps", type=int, default=defaults.plain_steps,
                        help="timed steps of plain HF at each point")
    parser.add_argument("--static-steps", nargs="+", default=list(defaults.static_steps), choices=list(STATIC_STEPS),
                        help="how the fast path (full cache and dynts) runs a decode step: the fused step, HF's "
                             "modules, or both side by side")
    parser.add_argument("--device", type=device_name, default=default_device(), help="torch device")
    parser.add_argument("--out", type=Path, default=Path("bench_decode_out"), help="folder for the JSON, table and plot")
    parser.add_argument("--replot", type=existing_file, default=None,
                        help="redraw the plot and table of a saved bench_decode.json into --out, measuring nothing")


def run(args: argparse.Namespace) -> int:
    from ..cli import make_settings

    if args.replot is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.replot.read_text()), args.out)
        return 0
    settings = make_settings(
        Settings, models=tuple(args.models), batch_size=args.batch_size, prompt_len=args.prompt_len,
        points=tuple(args.points), budget=args.budget, window=args.window, keep_ratio=args.keep_ratio,
        point_window=args.point_window, full_steps=args.full_steps, plain_steps=args.plain_steps,
        static_steps=tuple(args.static_steps), device=args.device,
    )
    run_benchmark(settings, args.out)
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))
