"""Triton KDA / Gated DeltaNet kernels against the naive float32 recurrence (relative RMSE <= 0.005).

The chunked prefill's cases run through each of its stage-2 variants (outputs inside the sequential pass over the
chunks, or a state-only pass then a parallel output kernel)."""

from __future__ import annotations

import pytest
import torch
from linear_attention_cases import OPS, TOLERANCE, make_inputs, naive_fp32, relative_rmse

from dynts.kernels.linear_attention import chunk_kda, fused_recurrent_kda
from dynts.kernels.linear_attention.chunk import PREFILL_VARIANTS, chunk_delta_rule_triton


@pytest.fixture(params=PREFILL_VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def run_chunk(op: str, inputs: dict, variant: str, cu_seqlens: torch.Tensor | None = None):
    """The prefill kernels with ``variant`` forced (the public op picks one per shape; inputs here are valid)."""
    return chunk_delta_rule_triton(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], scale=inputs["q"].shape[-1] ** -0.5,
        initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu_seqlens, per_channel=OPS[op][3], variant=variant)


def assert_close(op: str, output, final_state, reference_output, reference_state):
    assert torch.isfinite(output).all() and torch.isfinite(final_state).all()
    assert relative_rmse(output, reference_output) <= TOLERANCE, f"{op} output"
    assert relative_rmse(final_state, reference_state) <= TOLERANCE, f"{op} final state"


@pytest.mark.parametrize("tokens", [1, 63, 200, 257])
@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_matches_naive_over_lengths(device, variant, op, tokens):
    """Lengths below, at and across the 64-token chunk boundary, with an initial state."""
    inputs = make_inputs(op, 1, tokens, 1, 1, 64, 64, device=device, seed=tokens)
    assert_close(op, *run_chunk(op, inputs, variant), *naive_fp32(op, inputs))


@pytest.mark.parametrize("key_dim,value_dim", [(64, 64), (128, 128), (100, 72), (33, 47)])
@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_head_dims_and_grouped_values(device, variant, op, key_dim, value_dim):
    """Head dims 64, 128, even and odd non powers of two (padded with masks in the kernel); 2 value heads per q/k
    head."""
    inputs = make_inputs(op, 1, 70, 1, 2, key_dim, value_dim, device=device, seed=key_dim)
    assert_close(op, *run_chunk(op, inputs, variant), *naive_fp32(op, inputs))


@pytest.mark.parametrize("key_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_16bit_inputs(device, variant, op, dtype, key_dim):
    """16-bit q/k/v: output in the input dtype, state in fp32, against the recurrence on the same rounded inputs.
    With 128 key channels the state update runs as two 16-bit products; with 64 as one tf32 product."""
    inputs = make_inputs(op, 2, 80, 2, 2, key_dim, 64, dtype=dtype, device=device)
    output, final_state = run_chunk(op, inputs, variant)
    assert output.dtype == dtype and final_state.dtype == torch.float32
    assert_close(op, output, final_state, *naive_fp32(op, inputs))


def test_chunk_16bit_state_update_keeps_more_than_16_bits(device, variant):
    """bf16 GDN over 1,000 tokens of 128 x 128 heads: the final state within 0.001 of the recurrence (H200: 0.00028
    with the state update's remainder product, 0.00165 with V' rounded to bf16 alone). GDN reads k itself, so its
    state's error is the update's, not Kd's storage rounding (KDA's is 0.0017 either way)."""
    inputs = make_inputs("gdn", 2, 1000, 2, 2, 128, 128, dtype=torch.bfloat16, device=device)
    _, final_state = run_chunk("gdn", inputs, variant)
    assert relative_rmse(final_state, naive_fp32("gdn", inputs)[1]) <= 0.001


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_variable_length(device, variant, op):
    """Sequences of 1, 65 and 64 tokens packed in one row: chunks never mix sequences; one state per sequence."""
    cu_seqlens = torch.tensor([0, 1, 66, 130], dtype=torch.int32, device=device)
    inputs = make_inputs(op, 1, 130, 2, 2, 64, 32, device=device, sequences=3)
    output, final_state = run_chunk(op, inputs, variant, cu_seqlens=cu_seqlens)
    assert final_state.shape == (3, 2, 64, 32)
    assert_close(op, output, final_state, *naive_fp32(op, inputs, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_strong_gates_stay_finite(device, variant, op):
    """Gates down to -40 per token (2^-3700 over a chunk): decay ratios are never formed as overflowing quotients."""
    inputs = make_inputs(op, 1, 64, 1, 1, 32, 32, device=device, gate_scale=20.0)
    assert_close(op, *run_chunk(op, inputs, variant), *naive_fp32(op, inputs))


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_chunk_nearly_equal_keys(device, variant, op):
    """Keys all close to one direction, beta 1 and weak gates: (I + A) is far from the identity (A's entries near 1),
    so its inverse needs every term of the block series and of the substitution under it. fp32 inputs, so that the
    error measured is the inverse's (16-bit storage of W and Kd, ill-conditioned here, adds its own)."""
    inputs = make_inputs(op, 1, 128, 1, 1, 64, 64, device=device, seed=5, gate_scale=0.01)
    inputs["k"] = inputs["k"][:, :1] + 0.05 * inputs["k"]
    inputs["beta"] = torch.ones_like(inputs["beta"])
    assert_close(op, *run_chunk(op, inputs, variant), *naive_fp32(op, inputs))


def test_chunk_rejects_unknown_variant():
    inputs = make_inputs("kda", 1, 4, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="variant must be one of sequential_outputs, parallel_outputs"):
        run_chunk("kda", inputs, "fused")


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_fused_recurrent_updates_state_in_place(device, op, tokens):
    """Decode on strided views (as transformers passes them); the final state overwrites initial_state."""
    inputs = make_inputs(op, 2, tokens, 2, 4, 64, 48, device=device)
    reference_output, reference_state = naive_fp32(op, inputs)
    # q and k as slices of one wider projection, like transformers' split of a fused qkv tensor
    fused = torch.cat([inputs["q"], inputs["k"]], dim=-1)
    strided = dict(inputs, q=fused[..., :64], k=fused[..., 64:])
    assert not strided["q"].is_contiguous()
    state = strided.pop("initial_state")
    output, final_state = OPS[op][1](**strided, initial_state=state, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True)
    assert final_state.data_ptr() == state.data_ptr()
    assert_close(op, output, final_state, reference_output, reference_state)


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_fused_recurrent_can_keep_initial_state(device, op):
    """inplace_final_state=False returns a new state and leaves initial_state as it was; varlen decode."""
    cu_seqlens = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    inputs = make_inputs(op, 1, 3, 1, 1, 32, 32, device=device, sequences=2)
    before = inputs["initial_state"].clone()
    output, final_state = OPS[op][1](**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True,
                                     cu_seqlens=cu_seqlens, inplace_final_state=False)
    assert torch.equal(inputs["initial_state"], before)
    assert_close(op, output, final_state, *naive_fp32(op, inputs, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_prefill_then_decode_equals_one_pass(device, op):
    """Chunked prefill of 70 tokens, then decode 3 tokens at once and 2 one by one == one chunked pass of 75."""
    chunk, fused_recurrent = OPS[op][0], OPS[op][1]
    inputs = make_inputs(op, 2, 75, 2, 2, 64, 64, device=device)
    whole_output, whole_state = chunk(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)

    def part(start, end):
        return {name: inputs[name][:, start:end] for name in ("q", "k", "v", "g", "beta")}

    outputs = []
    output, state = chunk(**part(0, 70), initial_state=inputs["initial_state"], output_final_state=True,
                          use_qk_l2norm_in_kernel=True)
    outputs.append(output)
    for start, end in ((70, 73), (73, 74), (74, 75)):
        output, state = fused_recurrent(**part(start, end), initial_state=state, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)
        outputs.append(output)
    assert relative_rmse(torch.cat(outputs, dim=1), whole_output) <= TOLERANCE
    assert relative_rmse(state, whole_state) <= TOLERANCE


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the naive recurrence (same result, no Triton)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs("kda", 1, 5, 1, 1, 16, 16)
    output, final_state = chunk_kda(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    reference_output, reference_state = naive_fp32("kda", inputs)
    assert torch.allclose(output, reference_output) and torch.allclose(final_state, reference_state)


@pytest.mark.parametrize("change,message", [
    (dict(g=torch.zeros(1, 4, 2)), "g must be [batch, tokens, value_heads, key_dim]"),
    (dict(q=torch.zeros(1, 4, 2, 300), k=torch.zeros(1, 4, 2, 300)), "key_dim must be in [1, 256]"),
    (dict(v=torch.zeros(1, 4, 3, 8)), "value_heads (3) must be a multiple of q's heads (2)"),
    (dict(initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16)), "initial_state must be float32"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4])), None),
    (dict(cu_seqlens=torch.tensor([0, 3, 5])), "cu_seqlens must start at 0, not decrease and end at"),
])
def test_bad_inputs_name_the_argument(change, message):
    inputs = dict(q=torch.zeros(1, 4, 2, 8), k=torch.zeros(1, 4, 2, 8), v=torch.zeros(1, 4, 2, 8),
                  g=torch.zeros(1, 4, 2, 8), beta=torch.zeros(1, 4, 2))
    inputs.update(change)
    if message is None:  # a valid variable-length call: no error
        chunk_kda(**inputs)
        return
    with pytest.raises(ValueError) as error:
        chunk_kda(**inputs) if "cu_seqlens" in change else fused_recurrent_kda(**inputs)
    assert message in str(error.value)
