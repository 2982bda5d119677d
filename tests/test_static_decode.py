"""The fast path (StaticDecoder: fixed-shape steps, CUDA graph on GPU), through HF's modules and through the fused
step, against the plain DynTSCache generate path (HF's modules, sdpa, no static session)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dynts import CompressionConfig, DynTSCache, kernels
from dynts.integrations.hf_fused_step import FusedDecodeStep
from dynts.integrations.hf_static import StaticDecoder
from dynts.scorers import ExternalScorer
from tiny_models import ARCHITECTURES, left_padded_batch, tiny_model

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (the CUDA-graph + Triton path)")),
]


def _scorer(model) -> ExternalScorer:
    """A fixed random projection of the hidden state: deterministic scores that differ per token."""
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(model.device)
    return ExternalScorer(lambda hidden, ids: hidden.float() @ direction)


def _assert_same_run(fast: torch.Tensor, fast_cache: DynTSCache, plain: torch.Tensor, plain_cache: DynTSCache) -> None:
    """The static path's result, lengths after every step and resident positions are the plain path's."""
    assert torch.equal(fast, plain)
    fast_history, plain_history = list(fast_cache.stats.history), list(plain_cache.stats.history)
    assert fast_history[: len(plain_history)] == plain_history
    for layer in range(2):
        for fast_held, plain_held in zip(fast_cache.resident_positions(layer), plain_cache.resident_positions(layer)):
            assert torch.equal(fast_held[: plain_held.numel()], plain_held)


def _models(device: str, dtype: torch.dtype, arch: str = "llama"):
    model = tiny_model(arch, "sdpa", layers=2)
    # Norm weights start at 1 and biases at 0: make them matter, so that a step that skipped one would differ.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator) if name.endswith("weight")
                                else 0.3 * torch.randn(parameter.shape, generator=generator))
    ids, mask = left_padded_batch([19, 7, 12], seed=2)
    return model.to(device=device, dtype=dtype), ids.to(device), mask.to(device)


class _Logits(LogitsProcessor):
    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch, fused", [("llama", False), *((arch, True) for arch in ARCHITECTURES)])
def test_static_path_matches_plain_path_greedy_fp32(device: str, arch: str, fused: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens, lengths after every step and resident positions of the plain path; in between, the session's storage
    really was a ring (rows started elsewhere than index 0 after compactions), and after the call it is the plain
    layout again, holding the plain path's K/V."""
    from dynts.static import StaticSession

    model, ids, mask = _models(device, torch.float32, arch)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5, think_end=(5,))
    new_tokens = 90
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=2, pad_token_id=0)
    starts = []
    settle = StaticSession.settle

    def recording_settle(self, logged, step_ahead=None):
        moved = settle(self, logged, step_ahead)
        starts.append(self.compressor.kv.start.tolist())
        return moved

    monkeypatch.setattr(StaticSession, "settle", recording_settle)
    fast_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    decoder = StaticDecoder(model, fast_cache, fused=fused)
    fast = decoder.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    assert decoder.fused is fused
    assert plain_cache.stats.compactions >= 6
    assert torch.equal(fast, plain)
    assert sum(any(row) for row in starts) >= 3, starts
    fast_kv, plain_kv = fast_cache.compressor.kv, plain_cache.compressor.kv
    assert not fast_kv.ring and not bool(fast_kv.start.any())
    for row, length in enumerate(plain_cache.compressor.slots.physical_len_host):
        for fast_buffer, plain_buffer in ((fast_kv.keys, plain_kv.keys), (fast_kv.values, plain_kv.values)):
            torch.testing.assert_close(fast_buffer[:, row, :, :length], plain_buffer[:, row, :, :length],
                                       atol=1e-4, rtol=1e-4)  # the same K/V, computed by other kernels
    # generate stops when the last row emits EOS; the host learns it at its next sync, so the static path runs on
    # until then: the first of those steps stores that EOS (rows finished earlier stored theirs, on both paths),
    # and nothing grows after it.
    fast_history, plain_history = list(fast_cache.stats.history), list(plain_cache.stats.history)
    assert fast_history[: len(plain_history)] == plain_history
    for lengths in fast_history[len(plain_history):]:
        assert lengths == fast_history[len(plain_history)]
        assert all(0 <= after - before <= 1 for after, before in zip(lengths, plain_history[-1]))
    for layer in range(2):
        for fast_held, plain_held in zip(fast_cache.resident_positions(layer), plain_cache.resident_positions(layer)):
            assert torch.equal(fast_held[: plain_held.numel()], plain_held)  # and perhaps that last EOS
            assert fast_held.numel() - plain_held.numel() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_steps_queued_before_the_host_settles_change_nothing(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a short token log most synchronisations only read tokens back: the next step is then queued before the
    host tracks them (``may_step_before_settling``); the others queue it inside the settle, right behind a
    compaction. The result, the lengths after every step and the resident positions must still be the plain path's,
    through compactions and EOS."""
    from dynts.static import StaticSession

    model, ids, mask = _models(device, torch.float32)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5, think_end=(5,))
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=90,
                           do_sample=False, eos_token_id=2, pad_token_id=0)
    ahead = []
    settle = StaticSession.settle

    after_settling = []

    def counting_settle(self, logged, step_ahead=None):
        ahead.append(self.unsynced_steps)  # steps queued since the read: 1 when one ran ahead

        def counted_step() -> None:
            after_settling.append(self.compressor.stats.compactions)
            step_ahead()

        return settle(self, logged, None if step_ahead is None else counted_step)

    monkeypatch.setattr(StaticSession, "settle", counting_settle)
    fast_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    decoder = StaticDecoder(model, fast_cache)
    fast = decoder.generate(ids, attention_mask=mask, max_new_tokens=90, readback_every=3)
    assert ahead.count(1) >= 5 and ahead.count(0) >= 5, ahead  # both kinds of synchronisation happened
    assert len(set(after_settling)) >= 5, after_settling  # steps queued right behind several compactions
    assert plain_cache.stats.compactions >= 6
    _assert_same_run(fast, fast_cache, plain, plain_cache)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_static_path_logits_within_bf16_tolerance(device: str, fused: bool) -> None:
    """bf16, teacher-forced on the plain path's tokens: every step's logits agree within bf16 precision. (Eager
    static steps: forcing tokens needs a host copy per step, which a captured graph cannot take; the next test
    shows the graph replays these very steps.)"""
    model, ids, mask = _models(device, torch.bfloat16)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5)
    recorder = _Logits()
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=60, do_sample=False,
                           eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([recorder]))
    cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[])
    decoder = StaticDecoder(model, cache, use_cuda_graph=False, fused=fused)
    forced = iter(plain[:, ids.shape[1]:].T.tolist())
    fast_logits = []

    def choose(logits):
        fast_logits.append(logits.float().clone())
        return torch.tensor(next(forced), device=logits.device)

    decoder._choose = choose
    decoder.generate(ids, attention_mask=mask, max_new_tokens=60)
    assert len(fast_logits) == len(recorder.steps) == 60
    assert plain_cache.stats.compactions >= 5
    scale = max(float(step.float().abs().max()) for step in recorder.steps)
    worst = max(float((a - b.float()).abs().max()) for a, b in zip(fast_logits, recorder.steps))
    print(f"max |fast - plain| logit difference: {worst:.4f} (max |logit| {scale:.2f})")
    # bf16 carries 8 significant bits: a few units of its epsilon (2**-7) of the logit scale.
    assert worst <= 4 * 2**-7 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_replays_the_eager_static_steps_bf16(fused: bool) -> None:
    model, ids, mask = _models("cuda", torch.bfloat16)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5)
    runs = []
    for use_graph in (False, True):
        logits = []
        cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[])
        tokens = StaticDecoder(model, cache, use_cuda_graph=use_graph, fused=fused).generate(
            ids, attention_mask=mask, max_new_tokens=60, logits_callback=lambda x: logits.append(x.float().clone()))
        runs.append((tokens, torch.stack(logits), list(cache.stats.history)))
    assert runs[1][2] == runs[0][2]
    assert torch.equal(runs[1][0], runs[0][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-3, rtol=0)


def test_static_path_rejects_query_scorers() -> None:
    model, ids, mask = _models("cpu", torch.float32)
    cache = DynTSCache(model, CompressionConfig(budget=32, window=8), scorer="h2o", eos_token_id=[])
    with pytest.raises(ValueError, match="static decoding supports scorers that need no attention queries, not 'h2o'"):
        StaticDecoder(model, cache).generate(ids, attention_mask=mask, max_new_tokens=4)


def test_fused_step_is_chosen_where_supported_and_refused_elsewhere() -> None:
    config = CompressionConfig(budget=32, window=8)
    for arch in ARCHITECTURES:
        model = tiny_model(arch, "sdpa")
        assert StaticDecoder(model, DynTSCache(model, config, scorer=_scorer(model))).fused is True
    gelu = tiny_model("llama", "sdpa")
    gelu.config.hidden_act = "gelu"  # a family the fused step does not compute (its activation is SiLU)
    assert StaticDecoder(gelu, DynTSCache(gelu, config, scorer=_scorer(gelu))).fused is False
    with pytest.raises(ValueError, match="fused=True: the fused decode step does not support this model: hidden_act is "
                                         "'gelu', not 'silu'"):
        StaticDecoder(gelu, DynTSCache(gelu, config, scorer=_scorer(gelu)), fused=True)
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="fused must be True, False or None"):
        StaticDecoder(model, DynTSCache(model, config, scorer=_scorer(model)), fused=1)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # biases on q/k/v; q/k norms (Llama and Mistral: neither)
def test_fused_step_on_triton_kernels_matches_its_reference_path(device: str, arch: str) -> None:
    """One fused step with the Triton kernels (interpreted on CPU tensors, compiled on CUDA) against the same step on
    the torch references (the path the tests above check against HF's modules): the layouts the step hands the
    kernels (q, k and v weights read in place, views of their projection, per-head norms, strided storage) are the ones
    they compute right."""
    model, _, _ = _models(device, torch.float32, arch)
    step = FusedDecodeStep(model, {0: 0, 1: 1})
    generator = torch.Generator().manual_seed(0)
    rows, capacity = 3, 40
    key_cache, value_cache = (torch.randn(2, rows, 2, capacity, 16, generator=generator).to(device) for _ in range(2))
    slots = torch.tensor([5, capacity - 1, 20], device=device)  # each row's physical end: attention reads one more
    inputs = (torch.tensor([[4], [9], [50]], device=device), torch.tensor([[7], [60], [21]], device=device))
    initial_keys = key_cache.clone()
    want_keys, want_values = key_cache.clone(), value_cache.clone()
    with kernels.kernels_in_mode("reference"):
        want = step(*inputs, want_keys, want_values, slots, slots + 1)
    got = step(*inputs, key_cache, value_cache, slots, slots + 1)  # the device fixture: the kernels (interpreted on CPU)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key_cache, want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_cache, want_values, rtol=1e-5, atol=1e-5)
    written = torch.zeros(2, rows, 2, capacity, 16, dtype=torch.bool, device=device)
    written[:, torch.arange(rows), :, slots] = True  # every layer and KV head of each row's slot
    assert torch.equal(key_cache[~written], initial_keys[~written])
    assert not torch.isclose(key_cache[written], initial_keys[written]).any()


class _FakeEvent:
    """Stands in for a CUDA timing event recorded at ``at`` seconds (device clock = host clock here)."""

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return 1000 * (end.at - self.at)


def test_a_synchronisation_lasts_until_the_device_ran_what_it_queued() -> None:
    """Hand-computed timeline: start at 0; a read-only sync with a step queued ahead (its interval ends when the host
    is done); a compaction whose moves run on the device until 2 s after the host finished (its interval ends
    there, not at the host's end, and the next interval starts there); a sync on the host clock only (CPU); a
    compaction followed by the next step, queued before its moves ended and before the host was done."""
    from types import SimpleNamespace

    from dynts.integrations.hf_static import _Sync

    syncs = [
        # 4 steps to 10 s; idle until the step queued ahead at 10.5 s; host done at 12 s
        _Sync(4, 10.0, _FakeEvent(10.0), 10.5, None, 12.0),
        # 2 steps to 20 s; host done at 21 s; the moves it queued end at 23 s
        _Sync(2, 20.0, _FakeEvent(20.0), 21.0, _FakeEvent(23.0), 21.0),
        # 5 steps to 33 s; host done at 34 s; no device clock
        _Sync(5, 33.0, None, 34.0, None, 34.0),
        # 3 steps to 40 s; the next step queued at 40.5 s behind moves that end at 41.5 s; host done at 42 s
        _Sync(3, 40.0, _FakeEvent(40.0), 40.5, _FakeEvent(41.5), 42.0),
    ]
    timing = SimpleNamespace()
    StaticDecoder._record_timings(timing, 0.0, syncs)
    assert timing.sync_intervals == [4, 2, 5, 3]
    assert timing.sync_seconds == pytest.approx([0.5, 3.0, 1.0, 1.5])
    # 12 s / 4, 11 s / 2, 11 s / 5, 8 s / 3
    assert timing.step_seconds == pytest.approx([3.0] * 4 + [5.5] * 2 + [11 / 5] * 5 + [8 / 3] * 3)
    assert sum(timing.step_seconds) == pytest.approx(42.0)  # the intervals tile the run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device work queued after the host returns)")
def test_a_compaction_is_timed_with_the_device_work_it_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction that also queues a kernel spinning the GPU for well over 50 ms (the host returns at once): its
    synchronisation must last at least as long as that kernel ran, and the intervals without one must not. Each
    spin is timed by CUDA events around it (a spin counts clock cycles, so its length follows the GPU's clock)."""
    from dynts.compressor import DenseCompressor

    model, ids, mask = _models("cuda", torch.float32)
    config = CompressionConfig(budget=40, window=8, keep_ratio=0.5, protect_prompt=False)
    # A first run compiles the kernels, so that no interval of the timed run is slow for that reason.
    StaticDecoder(model, DynTSCache(model, config, scorer=_scorer(model))).generate(
        ids, attention_mask=mask, max_new_tokens=30, readback_every=4, eos_token_id=[])
    cache = DynTSCache(model, config, scorer=_scorer(model))
    compact = DenseCompressor.compact
    spins: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}  # steps tracked so far -> its spins

    def slow_compact(self, rows, ahead=None):
        compact(self, rows, ahead)
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        torch.cuda._sleep(200_000_000)
        events[1].record()
        spins.setdefault(len(cache.stats.history) - 1, []).append(events)

    monkeypatch.setattr(DenseCompressor, "compact", slow_compact)
    decoder = StaticDecoder(model, cache)
    decoder.generate(ids, attention_mask=mask, max_new_tokens=30, readback_every=4, eos_token_id=[])
    torch.cuda.synchronize()
    assert cache.stats.compactions >= 1
    spun = {steps: sum(begin.elapsed_time(end) for begin, end in events) / 1000 for steps, events in spins.items()}
    assert min(spun.values()) > 0.05
    ends = [sum(decoder.sync_intervals[: index + 1]) for index in range(len(decoder.sync_intervals))]
    held = list(cache.stats.history)  # each row's length after the prefill, then after each step
    compacting = {index for index, end in enumerate(ends)
                  if end < len(held) and any(after < before for before, after in zip(held[end - 1], held[end]))}
    # The settle of interval i runs when the steps before it are tracked: ends[i - 1] of them.
    spinning = {index: spun[steps] for index, steps in enumerate([0] + ends[:-1]) if steps in spun}
    assert compacting and set(spinning) == compacting, (ends, held, sorted(spun))
    for index, seconds in enumerate(decoder.sync_seconds):
        if index in compacting:
            assert seconds >= spinning[index], (index, seconds, spinning[index])
        else:
            assert seconds < 0.5 * min(spun.values()), (index, seconds)
            assert decoder.step_seconds[ends[index] - 1] * decoder.sync_intervals[index] < 0.5 * min(spun.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("think_end", [(87,), (23, 87)])
def test_compactions_queued_ahead_are_finished_or_planned_again(device: str, think_end: tuple[int, ...],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The session queues a compaction behind the steps before the host has read their tokens
    (``StaticSession.prepare``), its moves gated on the device by a check that no running row was fed an EOS or an
    end-of-thinking token in them. Where the check passed, the host finishes that compaction; where it failed, the
    device must have moved nothing and the host plans again. Both happen here (the marker, of one or two tokens, ends
    with a token this model emits often), and the result, the lengths after every step and the resident positions
    are the plain path's."""
    from dynts.compressor import DenseCompressor

    model, ids, mask = _models(device, torch.float32)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5, think_end=think_end)
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=90,
                           do_sample=False, eos_token_id=2, pad_token_id=0)
    compact = DenseCompressor.compact
    finished, planned_again = [], []

    def spy(self, rows, prepared=None):
        (planned_again if prepared is None else finished).append(rows)
        return compact(self, rows, prepared)

    monkeypatch.setattr(DenseCompressor, "compact", spy)
    fast_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    fast = StaticDecoder(model, fast_cache).generate(ids, attention_mask=mask, max_new_tokens=90, readback_every=4)
    # Planned again: the prefill's compaction (never queued ahead) and at least one whose check failed.
    assert len(finished) >= 2 and len(planned_again) >= 2, (finished, planned_again)
    _assert_same_run(fast, fast_cache, plain, plain_cache)


@pytest.mark.parametrize("device", DEVICES)
def test_a_compaction_observer_sees_what_the_plain_path_shows_it(device: str) -> None:
    """A ``compaction_observer`` gets, per compaction, the positions each row held before and kept after; for a
    compaction queued ahead of the host the 'before' must be read ahead of the moves too."""
    model, ids, mask = _models(device, torch.float32)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5)
    seen = {}
    for path in ("plain", "fast"):
        cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
        events = seen[path] = []
        cache.compressor.compaction_observer = lambda rows, before, after, events=events: events.append(
            (rows, [held.tolist() for held in before], [kept.tolist() for kept in after]))
        if path == "plain":
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=60, do_sample=False,
                           eos_token_id=2, pad_token_id=0)
        else:
            StaticDecoder(model, cache).generate(ids, attention_mask=mask, max_new_tokens=60, readback_every=4)
    assert len(seen["plain"]) >= 4
    last_kept = {}
    for rows, befores, kepts in seen["plain"]:  # each 'before': the row's last kept set, then the columns fed since
        for row, before, kept in zip(rows, befores, kepts):
            assert before == sorted(set(before)) and min(before) >= 0 and set(kept) < set(before)
            assert before[: len(last_kept.get(row, []))] == last_kept.get(row, [])
            last_kept[row] = kept
    assert seen["fast"] == seen["plain"]


def test_a_session_reads_only_the_tokens_it_prepared() -> None:
    """``read`` returns the tokens whose copy ``prepare`` queued, once: reading again without preparing again is an
    error, not the same tokens twice."""
    model, ids, mask = _models("cpu", torch.float32)
    cache = DynTSCache(model, CompressionConfig(budget=48, window=8), scorer=_scorer(model))
    cache.start_call(ids.shape[1], [2], 0)
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    session = cache.compressor.static_session(ids[:, -1:].clone(), pad_token_id=0)
    try:
        with pytest.raises(RuntimeError, match=r"call prepare\(\) first"):
            session.read()
        session.prepare()
        assert session.read() == [[], [], []]
        with pytest.raises(RuntimeError, match=r"call prepare\(\) first"):
            session.read()
    finally:
        session.close()


def test_ring_storage_holds_what_the_plain_storage_holds() -> None:
    """The same writes and compactions on a ring-laid-out and a plain ``KVStorage``: read in slot order (the copy
    ``keys_in_slot_order`` gives), after a growth of the buffers (which unrolls the ring) and after leaving the ring
    layout, both hold the same K/V in each row's first ``length`` slots; the ring's window stays where it was."""
    from dynts.storage import KVStorage

    generator = torch.Generator().manual_seed(4)
    shape = dict(num_layers=2, rows=3, kv_heads=2, key_dim=4, value_dim=3, capacity=12, dtype=torch.float32,
                 device="cpu")
    plain, ring = KVStorage(**shape), KVStorage(**shape)
    ring.set_ring(True)
    lengths = [0, 0, 0]

    def write(count: int) -> None:
        for _ in range(count):
            keys = torch.randn(2, 3, 2, 1, 4, generator=generator)
            values = torch.randn(2, 3, 2, 1, 3, generator=generator)
            slots = torch.tensor(lengths).view(-1, 1)
            for layer in range(2):
                plain.write(layer, keys[layer], values[layer], slots)
                ring.write(layer, keys[layer], values[layer], ring.physical_index(slots))
            for row in range(3):
                lengths[row] += 1

    def assert_same() -> None:
        for layer in range(2):
            ordered = ring.keys_in_slot_order(layer)
            for row, length in enumerate(lengths):
                assert torch.equal(ordered[row, :, :length], plain.keys[layer, row, :, :length])

    write(10)
    rounds = [[[0, 1, 5, 7, 8, 9], [3, 4, 5, 7, 8, 9], [0, 2, 4, 6, 8, 9]],
              [[2, 3, 4, 6, 8, 9], [0, 1, 2, 3, 8, 9], [1, 3, 5, 7, 8, 9]]]
    for keep in rounds:  # the last two slots (a window of 2) kept each time
        keep_index = torch.tensor(keep).view(1, 3, 1, 6)
        window = ring.physical_index(torch.tensor([[8, 9]] * 3)).view(1, 3, 1, 2, 1).expand(2, 3, 2, 2, 4)
        window_keys = ring.keys.gather(3, window)
        rows, keep_count, held = torch.tensor([0, 1, 2]), torch.tensor([6, 6, 6]), torch.tensor(lengths)
        for storage in (plain, ring):
            storage.compact(rows, keep_index, keep_count, held)
        lengths[:] = [6, 6, 6]
        assert torch.equal(ring.keys.gather(3, window), window_keys)
        assert_same()
        write(4)  # rows wrap around the capacity
        assert_same()
    assert bool(ring.start.any())
    plain.ensure_capacity(20)
    ring.ensure_capacity(20)
    assert not bool(ring.start.any())
    assert_same()
    ring.set_ring(False)
    for buffer, other in ((ring.keys, plain.keys), (ring.values, plain.values)):
        for row, length in enumerate(lengths):
            assert torch.equal(buffer[:, row, :, :length], other[:, row, :, :length])
