"""Distribution shift of the Importance Predictor: hidden states from a run with eviction vs a full cache.

The head is trained on hidden states of full-cache forward passes, but while decoding with eviction it reads
hidden states computed over a pruned cache. This script measures what that costs, on the same tokens:

1. generate with ``DynTSCache`` + ``PredictorScorer`` (eviction on), recording the final-norm hidden state
   of every token fed to the model, i.e. exactly what the predictor scored;
2. run the finished sequence once through the model with a full cache: labels (``labels.label_sequence``)
   and the full-cache hidden states of the same tokens;
3. per trace, over its thinking tokens: the top-30% recall of the head's scores on the evicted-run hidden
   states and on the full-cache hidden states (against the same labels), how much the two predicted top sets
   overlap, and the cosine similarity of the two hidden states (also over the tokens fed after the first
   compaction only: before it the two runs are identical).

    python -m dynts.training.predictor.shift --model PATH --predictor ip-head/ --synthetic 32 \\
        --budget 512 --window 128 --keep-ratio 0.3 --max-new-tokens 2048 --out shift.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynts.config import CompressionConfig, resolve_think_end
from dynts.predictor.head import ImportancePredictor
from .label_cli import CHAT_TEMPLATE, add_model_arguments, load_model
from .labels import LABEL_MODES, label_sequence, normalise
from dynts.predictor.scorer import PredictorScorer
from .traces import Trace, prompt_token_ids, trace_spans
from .train import recall_at


@torch.no_grad()
def generate_recording_hidden(
    model: torch.nn.Module, prompts: list[list[int]], scorer: PredictorScorer, config: CompressionConfig,
    max_new_tokens: int, pad_token_id: int, sampling: dict[str, Any],
) -> tuple[list[list[int]], list[torch.Tensor], list[int | None]]:
    """Generate a left-padded batch with eviction. Returns per row: the completion ids (up to EOS, exclusive),
    the hidden states [fed tokens, d] of the prompt and completion tokens fed, and the logical position of the
    first token fed after the row's first compaction (None: never compacted)."""
    from dynts.integrations.hf import DynTSCache
    from dynts.modeling import decoder_module

    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    cache = DynTSCache(model, config, scorer=scorer)
    steps: list[torch.Tensor] = []
    first_eviction: list[int | None] = [None] * len(prompts)

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if kwargs.get("past_key_values") is not cache:
            return
        steps.append(output.last_hidden_state.detach().float().cpu())
        # After this step's compaction, tokens fed from the next position on see a pruned cache.
        history = cache.stats.physical_len_history
        for row in range(len(prompts)):
            if first_eviction[row] is None and len(history) >= 2 and history[-1][row] < history[-2][row]:
                first_eviction[row] = cache.compressor.logical_len

    handle = decoder_module(model).register_forward_hook(record, with_kwargs=True)
    try:
        output = model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, past_key_values=cache,
            pad_token_id=pad_token_id, **sampling,
        )
    finally:
        handle.remove()
        cache.detach()
    eos = model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    hidden = torch.cat(steps, dim=1)  # [rows, fed columns, d]
    completions, row_hidden = [], []
    for row, prompt in enumerate(prompts):
        completion = []
        for token in output[row, width:].tolist():
            if token in eos_ids:
                break
            completion.append(token)
        completions.append(completion)
        pad = width - len(prompt)
        row_hidden.append(hidden[row, pad : width + len(completion)])
        if first_eviction[row] is not None:
            first_eviction[row] -= pad
    return completions, row_hidden, first_eviction


def trace_shift(
    model: torch.nn.Module, head: ImportancePredictor, trace: Trace, evicted_hidden: torch.Tensor,
    first_eviction: int | None, think_end: tuple[int, ...], mode: str, horizon: int | None, fraction: float,
) -> dict[str, float] | None:
    """The shift metrics of one trace, or None if it cannot be labelled (no end of thinking in answer mode)."""
    spans = trace_spans(trace, think_end)
    sequence = trace.prompt_ids + trace.completion_ids
    if mode == "answer" and (spans.answer_start is None or spans.answer_start >= len(sequence)):
        return None
    labels = label_sequence(model, sequence, mode=mode, horizon=horizon,
                            answer_start=spans.answer_start if mode == "answer" else None)
    tokens = torch.arange(spans.thinking_start, min(spans.thinking_end, evicted_hidden.shape[0]))
    tokens = tokens[labels.uniform.cpu()[tokens] > 0]
    if tokens.numel() < 2:
        return None
    target = normalise(labels.attention.cpu()[tokens], labels.uniform.cpu()[tokens])
    full_hidden = labels.hidden.float().cpu()[tokens]
    shifted_hidden = evicted_hidden[tokens]
    head = head.float().cpu()
    full_scores, shifted_scores = head(full_hidden), head(shifted_hidden)
    cosine = F.cosine_similarity(full_hidden, shifted_hidden, dim=-1)
    after = tokens >= first_eviction if first_eviction is not None else torch.zeros_like(tokens, dtype=torch.bool)
    return {
        "thinking_tokens": tokens.numel(),
        "tokens_after_first_eviction": int(after.sum()),
        "recall_full_cache": recall_at(full_scores, target, fraction),
        "recall_with_eviction": recall_at(shifted_scores, target, fraction),
        "predicted_top_overlap": recall_at(shifted_scores, full_scores, fraction),
        "hidden_cosine": float(cosine.mean()),
        "hidden_cosine_after_first_eviction": float(cosine[after].mean()) if bool(after.any()) else 1.0,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--predictor", type=Path, required=True, help="trained head directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="JSONL of questions")
    source.add_argument("--synthetic", type=int, metavar="COUNT", help="COUNT evaluation problems of the synthetic task")
    parser.add_argument("--question-field", default="problem")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--chat-template", choices=list(CHAT_TEMPLATE), default="auto")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--window", type=int, required=True)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--think-end", default="</think>")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=LABEL_MODES, default="answer")
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--recall-fraction", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None, help="write the per-trace and mean figures as JSON")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args)
    think_end = resolve_think_end(tokenizer, args.think_end)
    head = ImportancePredictor.load(args.predictor, model=model)
    if args.synthetic is not None:
        from dynts.evals.synthetic_task import EVAL_SEED, generate_problems

        questions = [problem.prompt for problem in generate_problems(args.synthetic, EVAL_SEED)]
    else:
        with open(args.data) as handle:
            questions = [json.loads(line)[args.question_field] for line in handle if line.strip()]
    questions = questions[: args.limit] if args.limit else questions
    template = CHAT_TEMPLATE[args.chat_template]
    config = CompressionConfig(budget=args.budget, window=args.window, keep_ratio=args.keep_ratio, think_end=think_end)
    sampling = {"do_sample": False} if args.temperature <= 0 else {
        "do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    per_trace: list[dict[str, Any]] = []
    skipped = 0
    for start in range(0, len(questions), args.batch_size):
        prompts = [prompt_token_ids(tokenizer, question, template) for question in questions[start : start + args.batch_size]]
        scorer = PredictorScorer(ImportancePredictor.load(args.predictor))
        completions, hidden, first_eviction = generate_recording_hidden(
            model, prompts, scorer, config, args.max_new_tokens, pad, sampling,
        )
        for offset, (prompt, completion) in enumerate(zip(prompts, completions)):
            trace = Trace(start + offset, start + offset, prompt, completion, "")
            result = trace_shift(model, head, trace, hidden[offset], first_eviction[offset], think_end, args.mode,
                                 args.horizon, args.recall_fraction)
            if result is None:
                skipped += 1
                continue
            per_trace.append({"index": trace.index, **result})
    if not per_trace:
        print("no trace could be labelled (none reached the end of thinking?)", file=sys.stderr)
        return 1
    keys = [key for key in per_trace[0] if key not in ("index", "thinking_tokens", "tokens_after_first_eviction")]
    evicted = [item for item in per_trace if item["tokens_after_first_eviction"] > 0]
    summary = {key: statistics.fmean(item[key] for item in per_trace) for key in keys}
    summary |= {"traces": len(per_trace), "skipped": skipped, "random_recall": args.recall_fraction,
                "evicted_traces": len(evicted)}
    if evicted:  # the traces where the two runs differ at all
        summary["evicted_traces_only"] = {key: statistics.fmean(item[key] for item in evicted) for key in keys}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "traces": per_trace, "settings": vars(args)}, indent=2, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynts.training.predictor.shift", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
