"""Linear-attention backend benchmark (GPU): accuracy and speed against fla, and hybrid-model decode TPOT.

    python -m dynts.evals.bench_linear_attention --out bench.json

1. Accuracy: dynts's chunk / fused-recurrent KDA and GDN against the naive fp32 recurrence and against fla
   (``fla-core``, optional) on the same bf16 inputs: relative RMSE of outputs and final states.
2. Prefill: chunk_kda and chunk_gated_delta_rule at 16k and 64k tokens by default (``--prefill-lengths``), 32 heads,
   128x128 state, bf16, side by side with fla in the same process: the public op (``dynts_ms``, the stage-2 variant
   it chose), each variant of ``kernels/linear_attention/chunk.py`` forced (outputs inside the sequential pass over
   the chunks, or a state-only pass then a parallel output kernel), their ratio and each one's speed-up over fla.
   Our first call at each length tunes the launch shapes (every config of each kernel's space timed once per shape)
   and chooses the variant, untimed here like fla's own autotuning; the configs and variants chosen are logged
   (``prefill_tuned_launches``).
3. Decode step: fused_recurrent_kda, one token, 32 heads, 128x128 fp32 state, batch 1 and 20: wall-clock per call
   of back-to-back eager calls (what a Python decode loop pays) and per replay of a CUDA graph (GPU time).
4. TPOT: decoder layers at Kimi-Linear width (hidden 2304; KDA 32 x 128; GQA attention 32 q / 8 kv heads x 128;
   dense MLP 9216), 8 layers, batch 1, one token per step under a CUDA graph, with synthesized caches at
   4k / 128k / 512k / 1M tokens: hybrid (3 KDA : 1 attention) vs the same model with attention in every layer,
   and the hybrid whose attention layers hold only a dynts budget of tokens (attention over ``--budget`` slots;
   scoring and compaction, done every few hundred steps, are not in this figure). The LM head is left out (it
   is the same for all variants).
Speed does not depend on weight values: weights and caches are random.

fla's first call at each shape autotunes for a minute or more, so on a 10-minute GPU call run the parts (and
``--ops``) in separate calls, e.g. ``--parts accuracy``, ``--parts prefill --ops gdn``, ``--parts decode,tpot``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dynts.kernels.linear_attention import chunk as chunk_module
from dynts.kernels.linear_attention import (
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_kda,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_kda,
)

HEADS, HEAD_DIM = 32, 128
DEVICE = "cuda"


def log(results: dict, key: str, value) -> None:
    """Record a figure and print it at once (the run may be cut short)."""
    results[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)


def relative_rmse(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.double(), reference.double()
    return ((output - reference).norm() / reference.norm()).item()


def gated_inputs(per_channel: bool, batch: int, tokens: int, heads: int = HEADS, dim: int = HEAD_DIM,
                 seed: int = 0) -> dict:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=generator)

    gate_shape = (batch, tokens, heads, dim) if per_channel else (batch, tokens, heads)
    return dict(
        q=randn(batch, tokens, heads, dim).bfloat16(),
        k=randn(batch, tokens, heads, dim).bfloat16(),
        v=randn(batch, tokens, heads, dim).bfloat16(),
        g=F.logsigmoid(randn(*gate_shape)),
        beta=torch.rand(batch, tokens, heads, device=DEVICE, generator=generator).bfloat16(),
    )


def wall_ms(fn: Callable[[], object], calls: int = 50, warmup: int = 5) -> float:
    """Mean wall-clock milliseconds per call of back-to-back calls (launch overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def graph_ms(fn: Callable[[], object], replays: int = 100, steps_per_graph: int = 1) -> float:
    """Milliseconds per call when ``fn`` is replayed from a CUDA graph (GPU time, no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * steps_per_graph)


def load_fla() -> dict | None:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gdn
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent_gdn
        from fla.ops.kda import chunk_kda as fla_chunk_kda
        from fla.ops.kda import fused_recurrent_kda as fla_recurrent_kda
    except ImportError as error:
        print(f"fla not importable ({error}): fla columns are left out", flush=True)
        return None
    return {"kda": (fla_chunk_kda, fla_recurrent_kda), "gdn": (fla_chunk_gdn, fla_recurrent_gdn)}


OPS = {
    "kda": (chunk_kda, fused_recurrent_kda, naive_recurrent_kda, True),
    "gdn": (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule, False),
}


def accuracy(results: dict, fla: dict | None, ops: list[str]) -> None:
    for name in ops:
        chunk, recurrent, naive, per_channel = OPS[name]
        for tokens, cu_seqlens in ((1000, None), (700, [0, 300, 301, 700])):
            inputs = gated_inputs(per_channel, 1, tokens, heads=4, seed=tokens)
            sequences = 1 if cu_seqlens is None else len(cu_seqlens) - 1
            h0 = torch.randn(sequences, 4, HEAD_DIM, HEAD_DIM, device=DEVICE) * 0.1
            cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE, dtype=torch.int64)
            common = dict(output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
            reference = naive(**{k: v.float() for k, v in inputs.items()}, initial_state=h0, **common)
            ours = chunk(**inputs, initial_state=h0, **common)
            tag = f"{name}_T{tokens}" + ("_varlen" if cu_seqlens else "")
            figures = {"chunk_vs_naive_out": relative_rmse(ours[0], reference[0]),
                       "chunk_vs_naive_state": relative_rmse(ours[1], reference[1])}
            ours_recurrent = recurrent(**inputs, initial_state=h0.clone(), **common)
            figures["recurrent_vs_naive_out"] = relative_rmse(ours_recurrent[0], reference[0])
            figures["recurrent_vs_naive_state"] = relative_rmse(ours_recurrent[1], reference[1])
            if fla is not None:
                fla_chunk, fla_recurrent = fla[name]
                theirs = fla_chunk(**inputs, initial_state=h0.clone(), **common)
                figures["fla_chunk_vs_naive_out"] = relative_rmse(theirs[0], reference[0])
                figures["fla_chunk_vs_naive_state"] = relative_rmse(theirs[1], reference[1])
                figures["chunk_vs_fla_out"] = relative_rmse(ours[0], theirs[0])
                figures["chunk_vs_fla_state"] = relative_rmse(ours[1], theirs[1])
                theirs_recurrent = fla_recurrent(**inputs, initial_state=h0.clone(), **common)
                figures["recurrent_vs_fla_out"] = relative_rmse(ours_recurrent[0], theirs_recurrent[0])
            log(results, f"accuracy_{tag}", figures)


def prefill(results: dict, fla: dict | None, lengths: list[int], ops: list[str]) -> None:
    for name in ops:
        chunk, per_channel = OPS[name][0], OPS[name][3]
        for tokens in lengths:
            inputs = gated_inputs(per_channel, 1, tokens)
            kwargs = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
            # The public op (the variant chosen for this shape; its first call, in the warm-up, chooses), then each
            # variant forced, each with its own launch shapes tuned in its warm-up.
            ours = wall_ms(lambda: chunk(**inputs, **kwargs), calls=10, warmup=2)
            figures = {"dynts_ms": ours, "dynts_Mtok_s": tokens / ours / 1e3}
            for variant in chunk_module.PREFILL_VARIANTS:
                figures[f"{variant}_ms"] = wall_ms(
                    lambda: chunk_module.chunk_delta_rule_triton(
                        **inputs, scale=HEAD_DIM**-0.5, initial_state=None, cu_seqlens=None, per_channel=per_channel,
                        variant=variant, **kwargs),
                    calls=10, warmup=2)
            figures["parallel_vs_sequential_speedup"] = (figures["sequential_outputs_ms"]
                                                         / figures["parallel_outputs_ms"])
            if fla is not None:
                theirs = wall_ms(lambda: fla[name][0](**inputs, **kwargs), calls=10, warmup=2)
                figures.update(fla_ms=theirs, fla_Mtok_s=tokens / theirs / 1e3, speedup_vs_fla=theirs / ours)
                for variant in chunk_module.PREFILL_VARIANTS:
                    figures[f"{variant}_speedup_vs_fla"] = theirs / figures[f"{variant}_ms"]
            log(results, f"prefill_{name}_T{tokens}", figures)
            inputs = None  # free the inputs before the next, longer run
            torch.cuda.empty_cache()
    log(results, "prefill_tuned_launches", chunk_module.tuned_launches())


def decode(results: dict, fla: dict | None, ops: list[str]) -> None:
    for name in ops:
        recurrent, per_channel = OPS[name][1], OPS[name][3]
        for batch in (1, 20):
            inputs = gated_inputs(per_channel, batch, 1)
            state = torch.randn(batch, HEADS, HEAD_DIM, HEAD_DIM, device=DEVICE) * 0.1

            def ours():
                return recurrent(**inputs, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)

            figures = {"dynts_eager_ms": wall_ms(ours, calls=200), "dynts_graph_ms": graph_ms(ours)}
            if fla is not None:
                fla_state = state.clone()

                def theirs():
                    return fla[name][1](**inputs, initial_state=fla_state, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)

                figures.update(fla_eager_ms=wall_ms(theirs, calls=200), fla_graph_ms=graph_ms(theirs))
            # Memory floor: the fp32 state read and written once.
            figures["state_traffic_us_at_3TBs"] = 2 * state.numel() * 4 / 3.0e12 * 1e6
            log(results, f"decode_{name}_batch{batch}", figures)


class DecodeModel:
    """Decoder layers of a Kimi-Linear-sized model for one-token decode steps (random weights, batch 1)."""

    hidden, intermediate, kv_heads, conv = 2304, 9216, 8, 4

    def __init__(self, layer_types: list[str], context: int, attention_slots: int):
        self.layer_types = layer_types
        width = HEADS * HEAD_DIM
        hidden = self.hidden

        def weight(rows, cols):
            return torch.randn(rows, cols, device=DEVICE, dtype=torch.bfloat16) / math.sqrt(cols)

        self.layers = []
        for layer_type in layer_types:
            layer = {"mlp_up": weight(2 * self.intermediate, hidden), "mlp_down": weight(hidden, self.intermediate)}
            if layer_type == "linear_attention":
                layer.update(
                    qkv=weight(3 * width, hidden), gate_a=weight(HEAD_DIM, hidden), gate_b=weight(width, HEAD_DIM),
                    beta=weight(HEADS, hidden), out_gate_a=weight(HEAD_DIM, hidden),
                    out_gate_b=weight(width, HEAD_DIM), out=weight(hidden, width),
                    conv_weight=torch.randn(3 * width, self.conv, device=DEVICE, dtype=torch.bfloat16) * 0.5,
                    conv_state=torch.zeros(1, 3 * width, self.conv, device=DEVICE, dtype=torch.bfloat16),
                    state=torch.randn(1, HEADS, HEAD_DIM, HEAD_DIM, device=DEVICE) * 0.01,
                    a_log=torch.zeros(HEADS, 1, device=DEVICE), dt_bias=torch.zeros(width, device=DEVICE),
                )
            else:
                kv_width = self.kv_heads * HEAD_DIM
                # Synthesized cache: `attention_slots` tokens already held; the step's token goes to the next slot.
                layer.update(
                    qkv=weight(width + 2 * kv_width, hidden), out=weight(hidden, width),
                    keys=torch.randn(1, self.kv_heads, attention_slots + 1, HEAD_DIM, device=DEVICE,
                                     dtype=torch.bfloat16),
                    values=torch.randn(1, self.kv_heads, attention_slots + 1, HEAD_DIM, device=DEVICE,
                                       dtype=torch.bfloat16),
                )
            self.layers.append(layer)
        self.slot = attention_slots
        self.x = torch.randn(1, 1, hidden, device=DEVICE, dtype=torch.bfloat16)

    def step(self) -> torch.Tensor:
        x = self.x
        width = HEADS * HEAD_DIM
        for layer_type, layer in zip(self.layer_types, self.layers):
            h = F.rms_norm(x, (self.hidden,))
            if layer_type == "linear_attention":
                mixed = F.linear(h, layer["qkv"])  # [1, 1, 3 * width]
                conv_state = layer["conv_state"]
                conv_state.copy_(torch.roll(conv_state, -1, dims=-1))
                conv_state[:, :, -1] = mixed[:, 0]
                mixed = F.silu((conv_state * layer["conv_weight"]).sum(-1)).unsqueeze(1)
                q, k, v = (t.view(1, 1, HEADS, HEAD_DIM) for t in mixed.split(width, dim=-1))
                gate = F.linear(F.linear(h, layer["gate_a"]), layer["gate_b"]).float() + layer["dt_bias"]
                g = (-layer["a_log"].exp() * F.softplus(gate.view(1, 1, HEADS, HEAD_DIM)))
                beta = torch.sigmoid(F.linear(h, layer["beta"]))
                o, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=layer["state"],
                                           use_qk_l2norm_in_kernel=True)
                o = F.rms_norm(o, (HEAD_DIM,)) * torch.sigmoid(
                    F.linear(F.linear(h, layer["out_gate_a"]), layer["out_gate_b"]).view(1, 1, HEADS, HEAD_DIM))
                x = x + F.linear(o.reshape(1, 1, width), layer["out"])
            else:
                kv_width = self.kv_heads * HEAD_DIM
                q, k, v = F.linear(h, layer["qkv"]).split([width, kv_width, kv_width], dim=-1)
                layer["keys"][:, :, self.slot] = k.view(1, self.kv_heads, HEAD_DIM)
                layer["values"][:, :, self.slot] = v.view(1, self.kv_heads, HEAD_DIM)
                attention = F.scaled_dot_product_attention(
                    q.view(1, 1, HEADS, HEAD_DIM).transpose(1, 2), layer["keys"], layer["values"], enable_gqa=True)
                x = x + F.linear(attention.transpose(1, 2).reshape(1, 1, width), layer["out"])
            up, gate_mlp = F.linear(F.rms_norm(x, (self.hidden,)), layer["mlp_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate_mlp) * up, layer["mlp_down"])
        return x


def tpot(results: dict, contexts: list[int], layers: int, budget: int) -> None:
    hybrid = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]
    full = ["full_attention"] * layers
    for context in contexts:
        figures = {}
        for label, types, slots in (("full_attention", full, context), ("hybrid_3to1", hybrid, context),
                                    ("hybrid_3to1_dynts_budget", hybrid, min(budget, context))):
            model = None
            try:
                model = DecodeModel(types, context, slots)
                figures[f"{label}_ms"] = graph_ms(model.step, replays=20)
                figures[f"{label}_eager_ms"] = wall_ms(model.step, calls=10, warmup=2)
            except torch.OutOfMemoryError:
                figures[f"{label}_ms"] = "out of memory"
            del model
            torch.cuda.empty_cache()
        if isinstance(figures.get("full_attention_ms"), float):
            figures["hybrid_speedup"] = figures["full_attention_ms"] / figures["hybrid_3to1_ms"]
            figures["hybrid_dynts_speedup"] = figures["full_attention_ms"] / figures["hybrid_3to1_dynts_budget_ms"]
        log(results, f"tpot_context{context}", figures)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    parser.add_argument("--parts", default="accuracy,prefill,decode,tpot", help="comma-separated parts to run")
    parser.add_argument("--ops", default="kda,gdn", help="ops for accuracy, prefill and decode: kda, gdn")
    parser.add_argument("--prefill-lengths", default="16384,65536", help="prefill lengths in tokens, comma-separated")
    parser.add_argument("--contexts", default="4096,131072,524288,1048576", help="TPOT context lengths, comma-separated")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers in the TPOT model (multiple of 4)")
    parser.add_argument("--budget", type=int, default=4096, help="tokens a dynts-compressed attention layer holds")


def run(args: argparse.Namespace) -> int:
    from dynts.cli import UsageError

    if args.layers < 4 or args.layers % 4:
        raise UsageError(f"--layers must be a positive multiple of 4, got {args.layers}")
    ops = args.ops.split(",")
    if any(op not in OPS for op in ops):
        raise UsageError(f"--ops {args.ops}: allowed kda, gdn (comma-separated)")
    try:
        prefill_lengths = [int(x) for x in args.prefill_lengths.split(",")]
        contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        raise UsageError(f"--prefill-lengths {args.prefill_lengths} / --contexts {args.contexts}: comma-separated ints") from None
    parts = {
        "accuracy": lambda: accuracy(results, fla, ops),
        "prefill": lambda: prefill(results, fla, prefill_lengths, ops),
        "decode": lambda: decode(results, fla, ops),
        "tpot": lambda: tpot(results, contexts, args.layers, args.budget),
    }
    unknown = [part for part in args.parts.split(",") if part not in parts]
    if unknown:
        raise UsageError(f"--parts {args.parts}: unknown {', '.join(unknown)}; allowed: {', '.join(parts)}")
    if not torch.cuda.is_available():
        raise UsageError("bench_linear_attention needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    fla = load_fla()
    for part in args.parts.split(","):
        try:
            parts[part]()
        except Exception as error:  # one failing part must not lose the figures of the others
            log(results, f"{part}_error", repr(error))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))
