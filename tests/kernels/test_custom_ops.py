"""``torch.ops.dynts.decode_attention``: a registered op whose fake implementation lets ``torch.compile`` trace a decode
step through it without a graph break, computing what the eager step computes."""

from __future__ import annotations

import pytest
import torch

import dynts.kernels  # noqa: F401  (registers the op)
from dynts.kernels.reference import decode_attention_reference

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")),
]
BATCH, KV_HEADS, GROUP, DIM, SLOTS = 3, 2, 3, 16, 37


def attention_inputs(device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(BATCH, KV_HEADS, SLOTS + 5, DIM, generator=generator)[:, :, :SLOTS]  # a strided storage view
    values = torch.randn(BATCH, KV_HEADS, SLOTS, DIM, generator=generator)
    queries = torch.randn(BATCH, KV_HEADS * GROUP, DIM, generator=generator)
    lengths = torch.tensor([SLOTS, 1, 20])
    return tuple(t.to(device) for t in (queries, keys, values, lengths))


@pytest.mark.parametrize("device", DEVICES)
def test_op_passes_opcheck_and_computes_the_reference(device):
    queries, keys, values, lengths = attention_inputs(device)
    arguments = (queries, keys, values, lengths, DIM**-0.5)
    # schema, fake (meta) implementation against the real one, no aliasing of inputs, dispatch under tracing
    torch.library.opcheck(torch.ops.dynts.decode_attention.default, arguments)
    got = torch.ops.dynts.decode_attention(*arguments)
    want = decode_attention_reference(queries, keys, values, lengths, scale=DIM**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_keeps_the_op_whole_and_matches_eager(device):
    queries, keys, values, lengths = attention_inputs(device)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, 24, generator=generator).to(device)
    projection = torch.randn(24, KV_HEADS * GROUP * DIM, generator=generator).to(device) / 5

    def step(hidden, projection, keys, values, lengths):
        step_queries = (hidden @ projection).view(BATCH, KV_HEADS * GROUP, DIM)
        out = torch.ops.dynts.decode_attention(step_queries, keys, values, lengths, DIM**-0.5)
        return torch.nn.functional.silu(out.flatten(1)) * 2.0

    called = []
    inductor = torch._dynamo.lookup_backend("inductor")

    def recording_inductor(graph_module, example_inputs):
        called.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return inductor(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording_inductor, fullgraph=True)  # fullgraph: a graph break raises
    got = compiled(hidden, projection, keys, values, lengths)
    assert any("dynts.decode_attention" in target for target in called), called
    want = step(hidden, projection, keys, values, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
