"""Programmatic dependent launch of the decode-step kernels: a chain of them gives the same bits launched as
dependents (each waiting at its top for the kernel before it) as launched one after another (each kernel against its
torch reference: the other kernel tests); it is off wherever the hardware or the interpreter lacks it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from dynts import kernels  # noqa: E402
from dynts.kernels import dependent_launch as launch  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= launch.MIN_CAPABILITY


def test_dependent_launch_is_off_without_a_hopper_gpu() -> None:
    assert launch.dependent_launch_options(torch.device("cpu")) == {"GRID_DEPENDENT": False}
    if HOPPER:
        assert launch.dependent_launch_options(torch.device("cuda")) == {"GRID_DEPENDENT": True, "launch_pdl": True}
        launch.set_dependent_launch(False)
        try:
            assert launch.dependent_launch_options(torch.device("cuda")) == {"GRID_DEPENDENT": False}
        finally:
            launch.set_dependent_launch(True)


def test_set_dependent_launch_takes_a_bool() -> None:
    with pytest.raises(ValueError, match="enabled must be True or False, got 1"):
        launch.set_dependent_launch(1)


def _layer_chain(x: torch.Tensor, weights: dict[str, torch.Tensor], cache: tuple[torch.Tensor, torch.Tensor],
                 layers: int) -> torch.Tensor:
    """Decode-step kernels back to back, each reading what the one before wrote at once: norm, a projection slow
    enough to still be running when a dependent would start too early, RoPE + store, attention over the stored K/V,
    the gated MLP."""
    rows, heads, kv_heads, dim = x.shape[0], 8, 2, 64
    key_cache, value_cache = cache
    hidden, residual = x, None
    for layer in range(layers):
        normed, residual = kernels.rms_norm(hidden, weights["norm"], eps=1e-5, residual=residual)
        projected = kernels.concat_linear(normed, [weights["q"], weights["k"], weights["v"]])
        queries, keys, values = projected.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        slots = torch.full((rows,), 200 + layer, device=x.device)
        queries = kernels.rotary_and_store(
            queries.reshape(rows, heads, dim), keys.reshape(rows, kv_heads, dim), values.reshape(rows, kv_heads, dim),
            weights["cos"], weights["sin"], key_cache, value_cache, layer, slots)
        lengths = torch.full((rows,), 201 + layer, device=x.device)
        attended = kernels.decode_attention(queries, key_cache[layer], value_cache[layer], lengths, scale=0.125)
        hidden = kernels.concat_linear(attended.reshape(rows, -1), [weights["o"]])
        normed, residual = kernels.rms_norm(hidden, weights["norm"], eps=1e-5, residual=residual)
        hidden = kernels.concat_linear(kernels.silu_gated_linear(normed, weights["gate"], weights["up"]),
                                       [weights["down"]])
    return kernels.rms_norm(hidden, weights["norm"], eps=1e-5, residual=residual)[0]


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0+ (programmatic dependent launch); "
                                       "the same chain runs serialised everywhere through the other kernel tests")
def test_a_chain_of_dependent_launches_in_a_graph_equals_the_serialised_chain() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden_size, ffn, rows, layers = 4096, 14336, 20, 4

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device="cuda") * shape[-1] ** -0.5).to(torch.bfloat16)

    weights = {"norm": 1 + weight(hidden_size) / 8, "q": weight(512, hidden_size), "k": weight(128, hidden_size),
               "v": weight(128, hidden_size), "o": weight(hidden_size, 512), "gate": weight(ffn, hidden_size),
               "up": weight(ffn, hidden_size), "down": weight(hidden_size, ffn)}
    angles = torch.rand(rows, 64, generator=generator, device="cuda") * 6
    weights["cos"], weights["sin"] = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    x = weight(rows, hidden_size) * 8
    cache = tuple(weight(layers, rows, 2, 256, 64) for _ in range(2))
    results = {}
    for dependent in (False, True):
        launch.set_dependent_launch(dependent)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                _layer_chain(x, weights, tuple(c.clone() for c in cache), layers)  # compile and tune outside capture
            torch.cuda.current_stream().wait_stream(stream)
            captured = tuple(c.clone() for c in cache)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _layer_chain(x, weights, captured, layers)
            replays = []
            for _ in range(20):  # a race shows up as one replay differing
                for target, source in zip(captured, cache):
                    target.copy_(source)
                graph.replay()
                replays.append((out.clone(), *(c.clone() for c in captured)))
            torch.cuda.synchronize()
        finally:
            launch.set_dependent_launch(True)
        # The output and the K/V the chain stored: the same bits in every replay, then in both launch modes.
        assert all(torch.equal(got, want) for replay in replays for got, want in zip(replay, replays[0]))
        results[dependent] = replays[0]
    assert all(torch.equal(got, want) for got, want in zip(results[True], results[False]))
