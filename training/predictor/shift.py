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
    python -m dynts.training.predictor.shift --model bundled --synthetic 8 --budget 256 --window 64

Every setting, the head and the input file are checked before the model loads.
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

from dynts.cli import (
    UsageError, add_model_arguments, chat_template_choice, check_predictor_fits, existing_file, load_model,
    load_tokenizer, make_settings, non_negative_int, positive_int, read_predictor, shipped_predictor, think_end_ids,
    unit_fraction,
)
from dynts.config import CompressionConfig
from dynts.predictor import PredictorScorer
from dynts.predictor.head import ImportancePredictor
from .label_cli import check_label_mode, read_questions
from .labels import LABEL_MODES, label_sequence, normalise
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
        history = cache.stats.history
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
    parser.add_argument("--predictor", type=Path, default=None,
                        help="trained head directory (default: the shipped head when --model is bundled)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_file, help="JSONL of questions")
    source.add_argument("--synthetic", type=positive_int, metavar="COUNT", help="COUNT evaluation problems of the synthetic task")
    parser.add_argument("--question-field", default="problem", help="question field of --data records")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N questions")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap questions in the tokenizer's chat template (default: when it has one)")
    cache = parser.add_argument_group("eviction (checked by CompressionConfig)")
    cache.add_argument("--budget", type=int, required=True, help="compact a row when it holds this many tokens; > --window")
    cache.add_argument("--window", type=int, required=True, help="most recent tokens always kept; >= 0")
    cache.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens kept, in (0, 1]")
    cache.add_argument("--think-end", default="</think>", help="text of the end-of-thinking marker")
    parser.add_argument("--max-new-tokens", type=positive_int, default=4096, help="generated tokens per trace at most")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="generation batch size")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=unit_fraction, default=0.95, help="nucleus sampling share (with --temperature > 0)")
    parser.add_argument("--top-k", type=non_negative_int, default=20, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--mode", choices=LABEL_MODES, default="answer",
                        help="labels: answer = attention from the answer tokens; future = from the next --horizon tokens")
    parser.add_argument("--horizon", type=positive_int, default=None, help="future mode: how many later tokens count")
    parser.add_argument("--recall-fraction", type=unit_fraction, default=0.3, help="share of tokens in the predicted top set")
    parser.add_argument("--out", type=Path, default=None, help="write the per-trace and mean figures as JSON")


def run(args: argparse.Namespace) -> int:
    # Everything is checked before the model loads: settings, head, questions, tokenizer and marker.
    check_label_mode(args.mode, args.horizon)
    settings = dict(budget=args.budget, window=args.window, keep_ratio=args.keep_ratio)
    make_settings(CompressionConfig, **settings)
    predictor_path = args.predictor or shipped_predictor(args.model)
    if predictor_path is None:
        raise UsageError("--predictor is required (a head from `dynts train-predictor`; only --model bundled ships one)")
    head, identity = read_predictor(predictor_path, args.model)
    if args.synthetic is not None:
        from dynts.evals.synthetic_task import EVAL_SEED, generate_problems

        questions = [problem.prompt for problem in generate_problems(args.synthetic, EVAL_SEED)]
    else:
        questions, _ = read_questions(args.data, args.question_field, "answer", need_answers=False)
    questions = questions[: args.limit] if args.limit else questions
    tokenizer = load_tokenizer(args.model)
    think_end = think_end_ids(tokenizer, args.think_end)
    config = make_settings(CompressionConfig, **settings, think_end=think_end)
    template = chat_template_choice(tokenizer, args.chat_template)

    model, tokenizer = load_model(args.model, args.device, args.dtype, tokenizer=tokenizer)
    check_predictor_fits(identity, model, predictor_path)
    sampling = {"do_sample": False} if args.temperature <= 0 else {
        "do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    per_trace: list[dict[str, Any]] = []
    skipped = 0
    for start in range(0, len(questions), args.batch_size):
        prompts = [prompt_token_ids(tokenizer, question, template) for question in questions[start : start + args.batch_size]]
        # The scorer owns its head (it moves and casts it): a fresh copy per batch keeps ``head`` the float32 original.
        scorer = PredictorScorer(ImportancePredictor.load(predictor_path))
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


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))
