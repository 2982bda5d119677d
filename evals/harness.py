"""``dynts eval``: accuracy and cost of KV-cache policies on reasoning datasets, with any local HF causal LM.

For every method (the full cache, each attention scorer, the learned predictor, and on the synthetic task an
oracle), every budget and every budget mode it generates answers, grades them, and writes one JSON line per sample,
per batch (timings and per-step statistics) and per (method, budget mode, budget) summary:

- pass@1 (mean over samples), pass@k (the unbiased estimator 1 - C(n-c, k) / C(n, k)), maj@k (a vote over the
  extracted answers, grouped by mathematical equivalence);
- per-item partial credit beside exact match (on the synthetic task: the share of saved values answered right);
- mean and peak resident tokens per row (the compressed caches' own lengths after every forward pass; the full
  cache's from its lengths), so that methods are compared at equal average KV;
- where the task knows its decision-critical tokens (synthetic: every copy of a saved value), their recall at each
  compaction, among the older tokens the scorer chose from (the window is kept anyway): per token, and per value
  (a value counts as kept when any of its copies stays);
- tokens/s and latency of whole ``generate`` calls (prefill, decoding and every eviction included);
- peak KV bytes: on CUDA from the allocator (``max_memory_allocated`` above the level before the call, so it
  also counts activations); on CPU from the caches' own accounting (``kv_bytes_source`` says which);
- per decoding step: seconds and KV bytes (physical rows for dynts, the padded rectangle for the full cache).

Budgets: ``--budget`` (tokens), ``--budget-fraction`` (of the mean thinking length) or ``--resident-fraction``:
for each budget mode, the budget whose eviction schedule keeps that mean share of the thinking length resident
(simulated from the lengths alone with ``dynts.policy``'s count functions: the schedule is the same for every
scorer), so every method runs at the same mean KV in both modes.

    dynts eval --model bundled --dataset synthetic --limit 64 --budget-fraction 0.15,0.25,0.4
    dynts eval --model bundled --dataset synthetic --synthetic-family reuse --resident-fraction 0.1,0.2,0.3,0.5 \\
        --budget-mode dynts,fixed --buffer 32
    dynts eval --model /models/R1-Distill-Llama-8B --dataset aime24 --budget 5000 --window 2000 \\
        --do-sample --samples 5 --methods full,h2o,predictor --predictor /heads/r1-llama
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cli import (
    BUNDLED, UsageError, add_model_arguments, chat_template_choice, check_predictor_fits, existing_folder, load_model,
    load_tokenizer, make_settings, model_label, non_negative_int, positive_int, read_predictor, shipped_predictor,
)
from ..config import BUDGET_MODES, DEFAULT_BUFFER
from .datasets import DATASETS, Sample, load_samples
from .grading import get_grader, majority_answer
from .metrics import RowLengths, budget_for_resident_share, compaction_recalls, resident_tokens

FULL = "full"
PREDICTOR = "predictor"  # the learned DynTS Importance Predictor: the scorer registry's name
ORACLE = "oracle"
# How tables and plots name a method (others: their own name).
METHOD_LABELS = {FULL: "full cache", PREDICTOR: "predictor (DynTS)"}
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def attention_methods() -> list[str]:
    """The baseline scorers of ``dynts.scorers``: all but those fed from outside (``external``) and the learned
    ``predictor``."""
    from dynts.scorers import SCORERS

    return sorted(name for name in SCORERS if name not in ("external", PREDICTOR))


def all_methods() -> list[str]:
    return [FULL, *attention_methods(), PREDICTOR, ORACLE]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by every method of a run."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    samples: int = 1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples > 1 and not self.do_sample:
            raise ValueError("samples > 1 needs do_sample=True (greedy decoding repeats the same answer)")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(
                f"sampling needs temperature > 0, top_p in (0, 1], top_k >= 0; got {self.temperature}, {self.top_p}, {self.top_k}"
            )


@dataclass(frozen=True)
class Setting:
    """One cell of the sweep: a method and, for compressed caches, its budget, window, budget mode (default
    ``dynts``), and the keep ratio (mode ``dynts``) or buffer (mode ``fixed``). ``resident_fraction``: the mean
    resident share of the thinking length the budget was chosen for (``--resident-fraction``), else None."""

    method: str
    budget: int | None = None
    window: int | None = None
    keep_ratio: float | None = None
    budget_mode: str | None = None
    buffer: int | None = None
    resident_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget_mode is None:
            object.__setattr__(self, "budget_mode", "dynts")

    @property
    def label(self) -> str:
        if self.budget is None:
            return self.method
        return f"{self.method}@{self.budget}" + ("" if self.budget_mode == "dynts" else f"/{self.budget_mode}")

    def compression_fields(self) -> dict[str, Any]:
        """The ``CompressionConfig`` fields this setting sets (keep_ratio only where it has one)."""
        ratio = {} if self.keep_ratio is None else {"keep_ratio": self.keep_ratio}
        return dict(budget=self.budget, window=self.window, budget_mode=self.budget_mode, buffer=self.buffer, **ratio)

    def compression_config(self, think_end: tuple[int, ...] | None = None) -> Any:
        """The ``CompressionConfig`` of a compressed setting (answer protection on when ``think_end`` is known)."""
        from dynts import CompressionConfig

        return CompressionConfig(**self.compression_fields(), think_end=think_end, protect_answer=think_end is not None)


@dataclass
class BatchOutcome:
    completions: list[str]
    new_tokens: list[int]
    finished: list[bool]
    # Per row: the metrics of its own passes (resident tokens; compaction recalls where the task knows its
    # critical tokens).
    rows: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


class StepClock:
    """A stopping criterion that never stops: it timestamps every decoding step and reads the allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.allocated: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated.append(torch.cuda.memory_allocated(self.device))
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    """K/V bytes of one token over the model's full-attention layers (for the full cache's accounting)."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = sum(1 for kind in layer_types if kind == "full_attention")
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def build_prompts(tokenizer: Any, samples: list[Sample], chat_template: bool) -> tuple[list[str], bool]:
    """Prompt texts, and whether the tokenizer must add its special tokens (False when a chat template did)."""
    if samples and samples[0].grader == "synthetic":
        return [sample.question for sample in samples], True
    texts = []
    for sample in samples:
        content = sample.question if sample.grader == "choice" else f"{sample.question}\n\n{MATH_INSTRUCTION}"
        if chat_template:
            texts.append(
                tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
            )
        else:
            texts.append(content)
    return texts, not chat_template


# The synthetic task's lines end with "|" (before each state) and ":" (before each computation).
SYNTHETIC_SEPARATORS = (":", "|")

# Finds the decision-critical tokens of a generated text (words, one per token) as {group: positions}: the
# groups are equally correct copies of one value. Only tasks that know their critical tokens have one.
CriticalCopies = Callable[[list[str]], dict[int, list[int]]]


def critical_copies_finder(grader_name: str) -> CriticalCopies | None:
    """The synthetic task's ``find_value_copies`` (every copy of a saved value); None for other tasks."""
    if grader_name != "synthetic":
        return None
    from .synthetic_task import find_value_copies

    return find_value_copies


def scorer_factory(method: str, tokenizer: Any, predictor: Any, synthetic: bool) -> Any:
    """A function returning a fresh scorer (a cache binds its scorer) for ``method``; None for the full cache."""
    if method == FULL:
        return None
    if method == PREDICTOR:
        if predictor is None:
            raise ValueError("method 'predictor' needs a trained importance predictor (--predictor PATH)")
        return predictor
    if method == ORACLE:
        from .synthetic_task import oracle_scorer

        return oracle_scorer
    if method == "sepllm":
        from dynts.scorers.positional import SEPARATOR_TEXTS, SepLLMScorer

        separator_ids = SepLLMScorer.from_tokenizer(tokenizer, SYNTHETIC_SEPARATORS if synthetic else SEPARATOR_TEXTS).separator_ids
        return lambda: SepLLMScorer(separator_ids)
    from dynts.scorers import get_scorer

    return lambda: get_scorer(method)


def make_cache(model: Any, setting: Setting, think_end: tuple[int, ...] | None, new_scorer: Any, passes: int) -> Any:
    """The ``past_key_values`` for one batch: None (HF's dynamic cache) for the full cache, else a DynTSCache whose
    length history holds all ``passes`` forward passes (for per-row resident tokens)."""
    if setting.method == FULL:
        return None
    from dynts import DynTSCache

    return DynTSCache(model, setting.compression_config(think_end), scorer=new_scorer(), history_limit=passes)


class CompactionLog:
    """A ``compaction_observer``: per compaction of a row, the positions it held before and those it kept.

    A row holds every column it is fed (its real prompt tokens, then one generated token per pass) until a
    compaction keeps a subset, so what it held before a compaction is what its previous compaction kept (at first,
    its real prompt columns) plus the columns fed since. That set is rebuilt here and checked against the cache's
    own ``before`` positions (copied before the moves), so a log that lost track fails loudly."""

    def __init__(self, cache: Any, attention_mask: torch.Tensor) -> None:
        self.cache = cache
        self.held = [[column for column, real in enumerate(mask) if real] for mask in attention_mask.tolist()]
        self.columns_seen = [attention_mask.shape[1]] * attention_mask.shape[0]
        self.events: list[tuple[int, list[int], list[int]]] = []  # (row, positions held before, positions kept)

    def __call__(self, rows: list[int], before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
        columns = self.cache.compressor.logical_len  # every column fed so far, this pass's included
        for row, held_before, kept in zip(rows, before, after):
            held = self.held[row] + list(range(self.columns_seen[row], columns))
            if held != held_before.tolist():
                raise RuntimeError(f"row {row} held {len(held_before)} positions before a compaction, the log rebuilt "
                                   f"{len(held)} ({'others' if len(held) == len(held_before) else 'a different count'})"
                                   ": a row no longer keeps every column it is fed")
            self.held[row], self.columns_seen[row] = kept.tolist(), columns
            self.events.append((row, held, self.held[row]))


@torch.no_grad()
def generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], add_special_tokens: bool, setting: Setting,
    sampling: Sampling, think_end: tuple[int, ...] | None, new_scorer: Any, seed: int,
    critical_copies: CriticalCopies | None = None,
) -> BatchOutcome:
    """Generate one batch with the setting's cache; time it, account its KV memory per step, and measure per row its
    resident tokens and (with ``critical_copies``) the critical-token recall of each compaction."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    cache = make_cache(model, setting, think_end, new_scorer, passes=sampling.max_new_tokens + 1)
    log = None
    if cache is not None and critical_copies is not None:
        log = CompactionLog(cache, inputs["attention_mask"])
        cache.compressor.compaction_observer = log
    clock = StepClock(device)
    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample}
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if cache is not None:
        kwargs["past_key_values"] = cache
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    output = model.generate(
        **inputs, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    prompt_len = inputs["input_ids"].shape[1]
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    generated = output[:, prompt_len:]
    eos = _eos_ids(model, tokenizer)
    new_tokens, finished = [], []
    for row in generated.tolist():
        stop = next((index for index, token in enumerate(row) if token in eos), None)
        finished.append(stop is not None)
        new_tokens.append(len(row) if stop is None else stop + 1)
    completions = tokenizer.batch_decode(generated, skip_special_tokens=True)

    # Per row, its physical length after each of its own forward passes (the prompt's, then one per generated
    # token but the last): the cache's history for a compressed cache, the prompt plus the tokens so far for the full.
    history = list(cache.stats.history) if cache is not None else None
    rows = []
    for row, (held_prompt, count, token_ids) in enumerate(zip(prompt_tokens, new_tokens, generated.tolist())):
        lengths = ([step[row] for step in history[:count]] if history is not None
                   else [held_prompt + step for step in range(count)])
        mean, peak = resident_tokens(lengths)
        metrics: dict[str, Any] = {"prompt_tokens": held_prompt, "mean_resident_tokens": mean, "peak_resident_tokens": peak,
                                   "think_end_index": _think_end_index(token_ids[:count], think_end)}
        if log is not None:
            words = tokenizer.convert_ids_to_tokens(token_ids[:count])
            # A generated token's logical position: after the (left-padded) prompt's columns.
            copies = {group: [prompt_len + index for index in indices] for group, indices in critical_copies(words).items()}
            recalls = [compaction_recalls(copies, held, kept, setting.window) for index, held, kept in log.events if index == row]
            metrics["token_recalls"] = [round(token, 4) for token, _ in recalls if token is not None]
            metrics["value_recalls"] = [round(value, 4) for _, value in recalls if value is not None]
        rows.append(metrics)

    step_seconds = [b - a for a, b in zip([start] + clock.times[:-1], clock.times)]
    record: dict[str, Any] = {
        "rows": len(prompts),
        "prompt_tokens": prompt_len,
        "seconds": seconds,
        "new_tokens": sum(new_tokens),
        "tokens_per_second": sum(new_tokens) / seconds,
        "steps": len(clock.times),
        "ms_per_step": 1000 * seconds / max(1, len(clock.times)),
        "step_seconds": [round(value, 6) for value in step_seconds],
    }
    if device.type == "cuda":
        record["kv_bytes_source"] = "allocator"
        record["peak_kv_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
        record["step_kv_bytes"] = [value - baseline for value in clock.allocated]
    else:
        record["kv_bytes_source"] = "cache_accounting"
        if cache is None:
            per_token = kv_bytes_per_token(model, next(model.parameters()).dtype)
            # After decoding step s (1-based) the dynamic cache holds prompt_len + s - 1 tokens per row.
            record["step_kv_bytes"] = [len(prompts) * (prompt_len + step) * per_token for step in range(len(clock.times))]
            record["peak_kv_bytes"] = max(record["step_kv_bytes"], default=0)
    if cache is not None:
        stats = cache.stats
        record.update(
            compactions=stats.compactions,
            evicted_tokens=stats.evicted_tokens,
            scoring_seconds=stats.scoring_seconds,
            eviction_seconds=stats.eviction_seconds,
            cache_peak_resident_kv_bytes=stats.peak_resident_kv_bytes,
            step_physical_len=[sum(lengths) for lengths in stats.history],
        )
        if device.type != "cuda":
            per_token = cache.compressor.kv.bytes_per_token
            # stats.history has one entry per forward pass, and each pass yields one decoding step.
            record["step_kv_bytes"] = [total * per_token for total in record["step_physical_len"]]
            record["peak_kv_bytes"] = stats.peak_resident_kv_bytes
        cache.detach()
    return BatchOutcome(completions, new_tokens, finished, rows, record)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _think_end_index(token_ids: list[int], think_end: tuple[int, ...] | None) -> int | None:
    """Index of the first end-of-thinking marker among a row's generated tokens, or None."""
    if think_end is None:
        return None
    from dynts.tracking import find_marker

    return find_marker(token_ids, think_end)


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``samples`` draws of which ``correct`` are right (Chen et al., 2021)."""
    if not 0 <= correct <= samples or not 1 <= k <= samples:
        raise ValueError(f"need 0 <= correct <= samples and 1 <= k <= samples, got n={samples} c={correct} k={k}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def row_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What sample records say beside correctness: mean partial credit, mean and peak resident tokens per row, and
    the critical-token and critical-value recall pooled over every compaction of every row that had a critical
    token (or value) to choose from (None where none did)."""
    scores: dict[str, Any] = {
        "partial_credit": statistics.mean(r["partial_credit"] for r in rows),
        "mean_resident_tokens": statistics.mean(r["mean_resident_tokens"] for r in rows),
        "peak_resident_tokens": max(r["peak_resident_tokens"] for r in rows),
    }
    for name, key in (("critical_token_recall", "token_recalls"), ("critical_value_recall", "value_recalls")):
        values = [value for r in rows for value in r.get(key, [])]
        scores[name] = statistics.mean(values) if values else None
    scores["recall_compactions"] = sum(len(r.get("token_recalls", [])) for r in rows)
    return scores


def summarize(setting: Setting, rows: list[dict[str, Any]], batches: list[dict[str, Any]], grader: Any,
              samples_per_problem: int) -> dict[str, Any]:
    """Aggregate the sample and batch records of one setting."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_problem[row["id"]].append(row)
    n = samples_per_problem
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {n})
    pass_k = {str(k): statistics.mean(pass_at_k(n, sum(r["correct"] for r in group), k) for group in by_problem.values()) for k in ks}
    majority_correct = []
    for group in by_problem.values():
        answers = [r["_extracted"] for r in group]
        winner = majority_answer(grader, answers)
        majority_correct.append(winner is not None and grader.is_correct(winner, group[0]["_reference"]))
    seconds = sum(b["seconds"] for b in batches)
    scores = row_scores(rows)
    summary = {
        "type": "summary",
        **asdict(setting),
        "problems": len(by_problem),
        "samples": n,
        "pass@1": pass_k["1"],
        "pass@k": pass_k,
        f"maj@{n}": statistics.mean(majority_correct),
        "partial_credit": scores["partial_credit"],
        "mean_resident_tokens": scores["mean_resident_tokens"],
        "peak_resident_tokens": scores["peak_resident_tokens"],
        "tokens_per_second": sum(b["new_tokens"] for b in batches) / seconds,
        "latency_s_per_batch": seconds / len(batches),
        "ms_per_step": statistics.mean(b["ms_per_step"] for b in batches),
        "peak_kv_bytes": max((b.get("peak_kv_bytes", 0) for b in batches), default=0),
        "kv_bytes_source": batches[0].get("kv_bytes_source"),
        "mean_new_tokens": statistics.mean(r["new_tokens"] for r in rows),
        "finished_rate": statistics.mean(r["finished"] for r in rows),
    }
    if setting.method != FULL:
        summary["compactions"] = sum(b.get("compactions", 0) for b in batches)
        summary["eviction_seconds"] = sum(b.get("eviction_seconds", 0.0) for b in batches)
        summary["scoring_seconds"] = sum(b.get("scoring_seconds", 0.0) for b in batches)
        for name in ("critical_token_recall", "critical_value_recall", "recall_compactions"):
            summary[name] = scores[name]
    return summary


def evaluate(
    model: Any,
    tokenizer: Any,
    samples: list[Sample],
    settings: list[Setting],
    sampling: Sampling,
    *,
    dataset: str,
    out_file: Any = None,
    chat_template: bool = False,
    predictor: Any = None,
    progress: bool = True,
    save_completions: bool = True,
) -> list[dict[str, Any]]:
    """Run every setting over ``samples``; write JSON lines to ``out_file`` (if given); return the summaries."""
    from tqdm.auto import tqdm

    from dynts import resolve_think_end

    grader = get_grader(samples[0].grader)
    references = {sample.id: grader.parse_reference(sample.reference) for sample in samples}
    try:
        think_end: tuple[int, ...] | None = resolve_think_end(tokenizer)
    except ValueError:
        think_end = None
        warnings.warn("the tokenizer has no </think> token: answer protection is off (the whole output is graded)", stacklevel=2)
    critical_copies = critical_copies_finder(grader.name)
    prompts, add_special = build_prompts(tokenizer, samples, chat_template)
    # Each prompt repeated once per sample, then cut into batches of sampling.batch_size rows.
    rows_plan = [(sample, text, index) for sample, text in zip(samples, prompts) for index in range(sampling.samples)]
    batches = [rows_plan[first : first + sampling.batch_size] for first in range(0, len(rows_plan), sampling.batch_size)]
    summaries = []
    bar = tqdm(total=len(settings) * len(batches), desc=dataset, disable=not progress, unit="batch")
    for setting in settings:
        bar.set_postfix_str(setting.label)
        new_scorer = scorer_factory(setting.method, tokenizer, predictor, synthetic=grader.name == "synthetic")
        rows, batch_records = [], []
        for batch_index, batch in enumerate(batches):
            outcome = generate_batch(
                model, tokenizer, [text for _, text, _ in batch], add_special, setting, sampling, think_end,
                new_scorer, seed=sampling.seed + batch_index, critical_copies=critical_copies,
            )
            record = {"type": "batch", "dataset": dataset, **asdict(setting), "batch": batch_index, **outcome.record}
            batch_records.append(record)
            _write(out_file, record)
            for (sample, _, sample_index), completion, new_tokens, finished, metrics in zip(
                batch, outcome.completions, outcome.new_tokens, outcome.finished, outcome.rows
            ):
                extracted = grader.extract(completion)
                correct = grader.is_correct(extracted, references[sample.id])
                row = {
                    "type": "sample", "dataset": dataset, **asdict(setting), "id": sample.id,
                    "sample_index": sample_index, "correct": bool(correct),
                    "partial_credit": grader.partial_credit(extracted, references[sample.id]),
                    "extracted": grader.display(extracted), "reference": sample.reference, "new_tokens": new_tokens,
                    "finished": finished, **metrics,
                }
                if save_completions:
                    row["completion"] = completion
                _write(out_file, row)
                rows.append({**row, "_extracted": extracted, "_reference": references[sample.id]})
            bar.update(1)
        summary = {"dataset": dataset, **summarize(setting, rows, batch_records, grader, sampling.samples)}
        summaries.append(summary)
        _write(out_file, summary)
    bar.close()
    return summaries


def _write(out_file: Any, record: dict[str, Any]) -> None:
    if out_file is not None:
        out_file.write(json.dumps(record) + "\n")
        out_file.flush()


def format_table(summaries: Iterable[dict[str, Any]]) -> str:
    """A plain-text table of summaries, one row per (method, budget mode, budget). Partial credit is the share of
    saved values answered right on synthetic (exact match elsewhere); recall: critical tokens kept per compaction
    (and values, any copy); mean / peak KV: resident tokens per row."""
    header = ["method", "mode", "budget", "pass@1", "partial", "recall tok/val", "mean KV", "peak KV", "tok/s",
              "compactions"]
    lines = [header]
    for s in summaries:
        recall = "-"
        if s.get("critical_token_recall") is not None:
            recall = f"{s['critical_token_recall']:.2f}/{s['critical_value_recall']:.2f}"
        lines.append([
            method_label(s["method"]), s.get("budget_mode") or "-", "-" if s["budget"] is None else str(s["budget"]),
            f"{s['pass@1']:.3f}", f"{s['partial_credit']:.3f}", recall, f"{s['mean_resident_tokens']:.0f}",
            str(s["peak_resident_tokens"]), f"{s['tokens_per_second']:.0f}", str(s.get("compactions", "-")),
        ])
    widths = [max(len(row[column]) for row in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text}: every budget must be an int >= 1")
    return values


def _fraction_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text}: every fraction must be in (0, 1]")
    return values


def _budget_modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or any(mode not in BUDGET_MODES for mode in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"{text!r}: must be one or both of {', '.join(BUDGET_MODES)}, comma-separated")
    return modes


def _step_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    if not (low.isdigit() and (high or low).isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or LOW-HIGH")
    return int(low), int(high or low)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .synthetic_task import FAMILIES, FAMILY_STEPS, REUSE_PERIODS

    add_model_arguments(parser, default=BUNDLED)
    parser.add_argument("--dataset", default="synthetic", choices=DATASETS, help="benchmark to evaluate on")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N problems (synthetic: N problems; default 100 there, all elsewhere)")
    parser.add_argument("--data-dir", type=existing_folder, default=None,
                        help="folder of <dataset>.jsonl files (default: $DYNTS_DATA_DIR, else the HF hub)")
    parser.add_argument("--synthetic-family", choices=FAMILIES, default=None,
                        help="synthetic: how the trace uses its saved values: dormant (read only by a later save and "
                             "the answer), reuse (re-read every --synthetic-reuse-every steps), branches (abandoned "
                             "branches) (default: dormant)")
    parser.add_argument("--synthetic-reuse-every", type=int, choices=REUSE_PERIODS, default=None,
                        help="synthetic, family reuse: re-read period in machine steps (default: 2)")
    steps = ", ".join(f"{family} {low}-{high}" for family, (low, high) in FAMILY_STEPS.items())
    parser.add_argument("--synthetic-steps", type=_step_range, default=None,
                        help=f"synthetic: machine steps per problem, N or LOW-HIGH (default: the family's, about 1,000 "
                             f"thinking tokens: {steps})")
    parser.add_argument("--synthetic-saves", type=positive_int, default=None,
                        help="synthetic: saved values the answer needs (default: the task's 6)")
    parser.add_argument("--synthetic-noise", type=non_negative_int, default=None,
                        help="synthetic: distractor level (default: the task's 3)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {', '.join(all_methods())} (default: full, every attention "
                             "scorer, predictor when a predictor head is given or shipped with the model, and oracle "
                             "on synthetic)")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="trained importance predictor head for method predictor (default: the shipped head when "
                             "--model is bundled)")
    budgets = parser.add_mutually_exclusive_group()
    budgets.add_argument("--budget", type=_int_list, default=None, help="KV budgets in tokens, comma-separated")
    budgets.add_argument("--budget-fraction", type=_fraction_list, default=None,
                         help="budgets as fractions of the mean thinking length, comma-separated. synthetic: of the "
                              "reference traces, so every budget is checked before the model loads; other datasets: "
                              "of the full cache's outputs (method full must run), so the budgets are known and "
                              "checked against --window only after the full-cache run (up front: --window against "
                              "the largest budget the smallest fraction can give)")
    budgets.add_argument("--resident-fraction", type=_fraction_list, default=None,
                         help="mean resident KV per row as fractions of the mean thinking length, comma-separated: for "
                              "each budget mode, the budget whose eviction schedule (the same for every scorer, "
                              "simulated from the lengths alone) holds that share on average, so that methods and "
                              "modes compare at equal mean KV; the measured mean is reported beside each result. "
                              "synthetic: from the reference traces, before the model loads; other datasets: from "
                              "the full cache's outputs (method full must run)")
    parser.add_argument("--budget-mode", type=_budget_modes, default=["dynts"],
                        help="dynts: compact a row when it reaches the budget, keeping the window and --keep-ratio of "
                             "the older tokens (DynTS); fixed: hold at most budget + --buffer and compact down to the "
                             "budget (R-KV / kvpress); both: dynts,fixed (default: dynts)")
    parser.add_argument("--buffer", type=positive_int, default=None,
                        help="--budget-mode fixed: tokens a row grows past the budget before it is compacted (default: "
                             "128, R-KV's)")
    parser.add_argument("--window", type=non_negative_int, default=None,
                        help="recent tokens always kept (default: 64 on synthetic, budget // 3 otherwise)")
    parser.add_argument("--keep-ratio", type=float, default=0.3,
                        help="--budget-mode dynts: share of the older tokens a compaction keeps, in (0, 1]")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generated tokens per answer at most (default: 16384; synthetic: the longest reference + 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample (with the settings below) instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling share (with --do-sample)")
    parser.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest tokens; 0 = all (with --do-sample)")
    parser.add_argument("--samples", type=int, default=1, help="samples per problem, for pass@k and maj@k (> 1 needs --do-sample)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate call")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the order of gpqa_d's choices)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the tokenizer's chat template (default: when it has one; never on synthetic)")
    parser.add_argument("--out", type=Path, default=Path("out/eval"),
                        help="folder for results.jsonl, tables.md and the plots")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the plots")
    parser.add_argument("--save-completions", action=argparse.BooleanOptionalAction, default=True,
                        help="keep every generated text in results.jsonl")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")


def resolve_methods(text: str | None, predictor: Path | None, model: Path, dataset: str) -> tuple[list[str], Path | None]:
    """--methods (None: every method that can run) and the predictor head for method predictor (--predictor, else
    the head shipped with the bundled model; None when the predictor does not run)."""
    head = predictor if predictor is not None else shipped_predictor(model)
    if text is None:
        methods = [FULL, *attention_methods()] + ([PREDICTOR] if head is not None else [])
        methods += [ORACLE] if dataset == "synthetic" else []
    else:
        methods = [method.strip() for method in text.split(",") if method.strip()]
        unknown = [method for method in methods if method not in all_methods()]
        if unknown or not methods:
            raise UsageError(f"--methods {text}: unknown {', '.join(unknown) or '(empty)'}; allowed: {', '.join(all_methods())}")
    if ORACLE in methods and dataset != "synthetic":
        raise UsageError(f"--methods {text}: oracle exists only for --dataset synthetic (it knows the task)")
    if PREDICTOR in methods and head is None:
        raise UsageError(f"--methods {text}: predictor needs --predictor PATH (a head from `dynts train-predictor`)")
    if predictor is not None and PREDICTOR not in methods:
        raise UsageError(f"--predictor is only used by method predictor, which --methods {text} leaves out")
    return methods, head if PREDICTOR in methods else None


def default_window(args: argparse.Namespace, budget: int) -> int:
    if args.window is not None:
        return args.window
    return 64 if args.dataset == "synthetic" else max(1, budget // 3)


@dataclass(frozen=True)
class BudgetChoice:
    """One budget of a run in one budget mode, where it came from (said in an error; "" for a budget given as
    such), and the mean resident share it was chosen for (``--resident-fraction``)."""

    budget_mode: str
    budget: int
    origin: str = ""
    resident_fraction: float | None = None


def compressed_setting(args: argparse.Namespace, method: str, choice: BudgetChoice) -> Setting:
    fixed = choice.budget_mode == "fixed"
    buffer = None
    if fixed:
        buffer = DEFAULT_BUFFER if args.buffer is None else args.buffer
    return Setting(method, choice.budget, default_window(args, choice.budget), None if fixed else args.keep_ratio,
                   choice.budget_mode, buffer, choice.resident_fraction)


def compression_settings(args: argparse.Namespace, choice: BudgetChoice) -> Any:
    """The ``CompressionConfig`` of a budget choice, checked: a bad value is a UsageError naming its option (and
    where the budget came from)."""
    from dynts import CompressionConfig

    probe = compressed_setting(args, FULL, choice)
    # --keep-ratio is checked in every budget mode (a fixed-budget setting has none of its own).
    fields = {**probe.compression_fields(), "keep_ratio": args.keep_ratio}
    try:
        return make_settings(CompressionConfig, names={"budget": "the budget"} if choice.origin else None, **fields)
    except UsageError as error:
        raise UsageError(f"{choice.origin}: {error}" if choice.origin else str(error)) from error


def compressed_settings(args: argparse.Namespace, methods: list[str], choices: list[BudgetChoice]) -> list[Setting]:
    """One setting per budget choice and compressed method, each checked by CompressionConfig."""
    settings = []
    for choice in choices:
        compression_settings(args, choice)
        settings += [compressed_setting(args, method, choice) for method in methods if method != FULL]
    return settings


def check_scorers(settings: list[Setting], tokenizer: Any, synthetic: bool) -> None:
    """Each compressed setting's scorer accepts its settings (e.g. SnapKV's observation window fits inside the
    window): checked with the tokenizer alone, before the model loads."""
    checked = set()
    for setting in settings:
        if setting.method in (FULL, PREDICTOR) or (setting.method, setting.window) in checked:
            continue
        checked.add((setting.method, setting.window))
        try:
            scorer_factory(setting.method, tokenizer, None, synthetic)().validate(setting.compression_config())
        except ValueError as error:
            raise UsageError(f"method {setting.method} with --window {setting.window}: {error}") from error


def fraction_choices(args: argparse.Namespace, mean_trace: float, rows: list[RowLengths] | None) -> list[BudgetChoice]:
    """--budget-fraction or --resident-fraction -> a budget per budget mode and fraction. ``mean_trace``: the mean
    thinking length; ``rows``: every problem's lengths (for --resident-fraction's schedule)."""
    choices = []
    for mode in args.budget_mode:
        if args.budget_fraction is not None:
            for fraction in args.budget_fraction:
                budget = max(2, round(fraction * mean_trace))
                origin = f"--budget-fraction {fraction:g} gives budget {budget} ({fraction:g} x {mean_trace:.0f} thinking tokens)"
                choices.append(BudgetChoice(mode, budget, origin))
            continue
        for fraction in args.resident_fraction:
            budget = resident_budget(args, mode, fraction, mean_trace, rows)
            choices.append(BudgetChoice(mode, budget, f"--resident-fraction {fraction:g} gives budget {budget}", fraction))
    return list(dict.fromkeys(choices))


def resident_budget(args: argparse.Namespace, mode: str, fraction: float, mean_trace: float, rows: list[RowLengths]) -> int:
    """The budget of ``mode`` whose schedule keeps ``fraction`` of the mean thinking length resident on average."""
    origin = f"--resident-fraction {fraction:g} with --budget-mode {mode}"
    # With --window (or on synthetic) the smallest budget is window + 1; otherwise the window follows the budget.
    smallest = 2 if args.window is None and args.dataset != "synthetic" else default_window(args, 2) + 1
    compression_settings(args, BudgetChoice(mode, smallest, origin))  # the other settings, checked once, by name
    try:
        return budget_for_resident_share(lambda budget: compression_settings(args, BudgetChoice(mode, budget, origin)),
                                         rows, mean_trace, fraction, smallest)[0]
    except ValueError as error:
        raise UsageError(f"{origin}: {error}") from error


def resolve_settings(args: argparse.Namespace, samples: list[Sample], methods: list[str], max_new_tokens: int,
                     prompt_tokens: list[int] | None) -> tuple[list[Setting], float | None]:
    """Settings in run order (the full cache first: on real datasets its outputs size fraction budgets) and the mean
    thinking length when it is known before any run (synthetic: the reference traces, whose prompts hold
    ``prompt_tokens`` tokens). On a real dataset with --budget-fraction or --resident-fraction only the full cache's
    setting is returned; ``fraction_choices`` follows its run."""
    compressed = [method for method in methods if method != FULL]
    fractions = args.budget_fraction or args.resident_fraction
    settings = [Setting(FULL)] if FULL in methods else []
    if compressed and args.budget is None and fractions is None:
        raise UsageError(f"methods {', '.join(compressed)} need --budget, --budget-fraction or --resident-fraction")
    if not compressed and (args.budget or fractions):
        raise UsageError("--budget / --budget-fraction / --resident-fraction are only used by compressed methods; "
                         "--methods has none")
    if args.buffer is not None and "fixed" not in args.budget_mode:
        raise UsageError(f"--buffer is used by --budget-mode fixed only (--budget-mode is {','.join(args.budget_mode)})")
    if args.budget is not None:
        choices = [BudgetChoice(mode, budget) for mode in args.budget_mode for budget in args.budget]
        return settings + compressed_settings(args, methods, choices), None
    if fractions is None:
        return settings, None
    if args.dataset == "synthetic":
        mean_trace = statistics.mean(sample.meta["trace_length"] for sample in samples)
        # The model writes the reference completion, then its end-of-sequence token.
        rows = [RowLengths(prompt, sample.meta["completion_tokens"] + 1, sample.meta["trace_length"])
                for sample, prompt in zip(samples, prompt_tokens)]
        return settings + compressed_settings(args, methods, fraction_choices(args, mean_trace, rows)), mean_trace
    option = "--budget-fraction" if args.budget_fraction else "--resident-fraction"
    if FULL not in methods:
        raise UsageError(f"{option} on a real dataset needs method full (its outputs size the budgets)")
    # The largest budget the smallest fraction can give: every output max_new_tokens long.
    largest = max(2, round(min(fractions) * max_new_tokens))
    if args.budget_fraction and args.window is not None and largest <= args.window:
        raise UsageError(f"--budget-fraction {min(fractions):g} gives at most {largest} tokens (outputs of "
                         f"--max-new-tokens {max_new_tokens}), not above --window {args.window}")
    return settings, None


def synthetic_task(args: argparse.Namespace) -> Any:
    """The synthetic task's settings from the --synthetic-* options (None on other datasets, where they are refused)."""
    from .synthetic_task import TaskConfig

    given = {name: getattr(args, f"synthetic_{name}") for name in ("family", "reuse_every", "steps", "saves", "noise")}
    if args.dataset != "synthetic":
        used = [f"--synthetic-{name.replace('_', '-')}" for name, value in given.items() if value is not None]
        if used:
            raise UsageError(f"{', '.join(used)}: only for --dataset synthetic (--dataset is {args.dataset})")
        return None
    values = {name: value for name, value in given.items() if value is not None}
    return make_settings(TaskConfig, names={name: f"--synthetic-{name.replace('_', '-')}" for name in given}, **values)


def load_eval_samples(args: argparse.Namespace) -> list[Sample]:
    """The dataset's problems; a bad file, field or task setting is a UsageError."""
    synthetic = synthetic_task(args)
    try:
        return load_samples(args.dataset, data_dir=args.data_dir, limit=args.limit, synthetic=synthetic, seed=args.seed)
    except (OSError, ValueError, RuntimeError) as error:
        raise UsageError(f"--dataset {args.dataset}: {error}") from error


def run(args: argparse.Namespace) -> int:
    # Everything is checked before the model loads: methods, predictor, problems, sampling, budgets, output folder.
    methods, predictor_path = resolve_methods(args.methods, args.predictor, args.model, args.dataset)
    samples = load_eval_samples(args)
    synthetic = args.dataset == "synthetic"
    max_new_tokens = args.max_new_tokens or (
        max(sample.meta["completion_tokens"] for sample in samples) + 64 if synthetic else 16384
    )
    sampling = make_settings(
        Sampling, max_new_tokens=max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
    )
    tokenizer = load_tokenizer(args.model)
    prompt_tokens = [len(tokenizer(sample.question)["input_ids"]) for sample in samples] if synthetic else None
    settings, mean_trace = resolve_settings(args, samples, methods, max_new_tokens, prompt_tokens)
    head = identity = None
    if predictor_path is not None:
        head, identity = read_predictor(predictor_path, args.model)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out}: {error}") from error
    chat_template = False if synthetic else chat_template_choice(tokenizer, args.chat_template)
    check_scorers(settings, tokenizer, synthetic)

    model, tokenizer = load_model(args.model, args.device, args.dtype, tokenizer=tokenizer)
    predictor = None
    if head is not None:
        from dynts.predictor import PredictorScorer

        check_predictor_fits(identity, model, predictor_path)

        def predictor() -> PredictorScorer:  # a cache binds its scorer: one fresh scorer per cache
            return PredictorScorer(head, model=model)
    results_path = args.out / "results.jsonl"
    common = dict(dataset=args.dataset, chat_template=chat_template, predictor=predictor, progress=args.progress,
                  save_completions=args.save_completions)
    with open(results_path, "w") as out_file:
        record = dict(window=args.window, keep_ratio=args.keep_ratio, budget_modes=args.budget_mode, buffer=args.buffer)
        _write(out_file, run_record(args.model, args.dataset, samples, methods, mean_trace, **record))
        summaries = evaluate(model, tokenizer, samples, settings, sampling, out_file=out_file, **common) if settings else []
        if (args.budget_fraction or args.resident_fraction) and not synthetic:
            mean_trace, rows = full_cache_lengths(results_path)
            try:
                compressed = compressed_settings(args, methods, fraction_choices(args, mean_trace, rows))
                check_scorers(compressed, tokenizer, synthetic)
            except UsageError as error:
                raise UsageError(f"{error} (the full-cache results are in {results_path})") from error
            print(f"mean thinking length {mean_trace:.0f} tokens -> budgets {sorted({s.budget for s in compressed})}")
            _write(out_file, run_record(args.model, args.dataset, samples, methods, mean_trace, **record))
            summaries += evaluate(model, tokenizer, samples, compressed, sampling, out_file=out_file, **common)
    print(format_table(summaries))
    print(f"results: {results_path}")
    from .plots import write_tables

    print(f"tables: {write_tables(results_path, args.out / 'tables.md')}")
    if args.plots:
        from .plots import plot_results

        for path in plot_results(results_path, args.out):
            print(f"plot: {path}")
    return 0


def run_record(model: Path, dataset: str, samples: list[Sample], methods: list[str], trace_tokens: float | None, *,
               window: int | None, keep_ratio: float, budget_modes: list[str], buffer: int | None) -> dict[str, Any]:
    """The record opening results.jsonl: what ran, for the plots' and tables' titles. ``trace_tokens``: the length
    budget and resident fractions refer to (None until known)."""
    synthetic = dataset == "synthetic"
    task = None
    if synthetic and samples:
        meta = samples[0].meta
        task = {"family": meta["family"], "reuse_every": meta["reuse_every"], "saves": meta["saves"], "noise": meta["noise"]}
    return {
        "type": "run", "model": model_label(model), "dataset": dataset, "task": task, "problems": len(samples),
        "methods": methods, "window": window, "keep_ratio": keep_ratio, "budget_modes": budget_modes, "buffer": buffer,
        "trace_tokens": trace_tokens, "trace_tokens_source": "reference traces" if synthetic else "full-cache outputs",
    }


def full_cache_lengths(results_path: Path) -> tuple[float, list[RowLengths]]:
    """Mean generated length of the full cache's samples in ``results_path`` and every sample's lengths: on real
    datasets the thinking length is known only from running, and it sizes the fraction budgets."""
    rows = []
    with open(results_path) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("type") == "sample" and record["method"] == FULL:
                rows.append(RowLengths(record["prompt_tokens"], record["new_tokens"], record["think_end_index"]))
    if not rows:
        raise ValueError("no full-cache samples to size the fraction budgets from")
    return statistics.mean(row.generated_tokens for row in rows), rows
