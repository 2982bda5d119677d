"""Train the tiny reasoner that ships with the package (``dynts/assets/reasoner``).

A Llama-architecture decoder (about 3.6M parameters) learns the synthetic register-machine task
(``dynts.evals.synthetic_task``) on a mixture of its families (dormant, reuse with every re-read period,
abandoned branches) from freshly generated problems: loss on the trace and the answer only, bf16 autocast on
CUDA, AdamW with warm-up and cosine decay, a fixed seed. At the end it saves the checkpoint (safetensors) and
tokenizer, reloads them in fp32, measures full-cache greedy accuracy (exact and per save) on held-out problems
of every family, and writes the problems to label for the importance predictor. Everything goes to ``--out``.

Recipe for the bundled model (one H200; ``--steps auto`` would instead time a probe and log the step count that
``--steps N`` replays), then the predictor from the model's own traces:

    python -m dynts.training.reasoner --out OUT --seed 0 --steps 3000 --max-train-seconds 300 --augment 0.5 \
        --augment-start 0.3 --eval-problems 256 --eval-batch 512 --workers 8 --proxy-problems 128 \
        --proxy-every 1000 --no-sweep --predictor-problems 200 --predictor-seed 7
    dynts label --model OUT --data OUT/predictor_problems.jsonl --grader synthetic --greedy --dtype float32 \
        --batch-size 200 --max-new-tokens 2048 --seed 7 --out LABELS
    dynts train-predictor --labels LABELS --out OUT/predictor --seed 0

``--augment`` trains part of the batches under eviction-like key masking (``Augmentation``), so the model copes
with evicted redundant tokens and reads a saved value from whichever of its copies survived.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dynts.cli import UsageError
from dynts.evals.synthetic_task import (
    EVAL_SEED,
    FAMILIES,
    MAX_NOISE,
    MAX_SAVES,
    MAX_STEPS,
    REUSE_PERIODS,
    THINK_END,
    VOCAB,
    Problem,
    TaskConfig,
    build_tokenizer,
    encode_words,
    generate_problem,
    generate_problems,
)

# Held-out problems come from EVAL_SEED; training problems from string seeds derived from --seed.
HELDOUT_SEED = EVAL_SEED
# Each batch draws its problems' step counts from one of these ranges, in turn (similar lengths, little padding).
STEP_BUCKETS: tuple[tuple[int, int], ...] = ((4, 40), (40, 80), (80, 120), (120, MAX_STEPS))
MAX_CHECKPOINT_BYTES = 15_000_000
BOS, EOS, PAD, THINK_END_ID = (VOCAB.index(word) for word in ("<bos>", "<eos>", "<pad>", THINK_END))


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    intermediate_size: int = 512
    # A branches trace of MAX_STEPS steps at noise MAX_NOISE is about 6,500 tokens (RoPE has no learned table,
    # so this only documents the longest trained context).
    max_positions: int = 8192


def build_model(shape: ModelShape, seed: int) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` for the task's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = {word: index for index, word in enumerate(VOCAB)}
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def family_variants(families: tuple[str, ...]) -> list[TaskConfig]:
    """One default config per family and re-read period (the held-out suite and the predictor's problems)."""
    variants = []
    for family in families:
        if family == "reuse":
            variants += [TaskConfig(family="reuse", reuse_every=period) for period in REUSE_PERIODS]
        else:
            variants.append(TaskConfig(family=family))
    return variants


@dataclass(frozen=True)
class Augmentation:
    """Eviction-like key masking on a fraction of batches, so the model does not lean on redundant tokens and
    reads a saved value from any of its copies.

    In a masked batch each row draws a window ``W``, a keep probability ``p`` and a copy-hiding probability
    ``q``; a key is visible to a query while it is among the query's last ``W`` tokens, and after that only if
    it belongs to the prompt, or is a copy of a saved value that survived its coin of probability ``1 - q``
    (originals included, so the model learns to use restatements and re-reads), or is another token kept by a
    coin of probability ``p``: what a cache that keeps some copies plus some random tokens shows the model. A
    read (restatement, re-read, answer value) whose save has no copy visible to it gets no loss: no cache state
    lets the model know it, and training it to guess would teach it to ignore the copies.
    """

    fraction: float = 0.0
    window: tuple[int, int] = (40, 192)
    keep_probability: tuple[float, float] = (0.0, 0.5)
    hide_copy_probability: tuple[float, float] = (0.0, 0.75)
    start_batch: int = 0  # batches before this index are never masked (learn the task first)


@dataclass(frozen=True)
class TrainingSequence:
    """One training problem as token ids (bos + prompt + completion + eos) and its annotation, in sequence
    indices: ``copies`` (save -> indices of its value's copies) and ``reads`` ((index, save) of each token that
    needs an earlier copy)."""

    ids: list[int]
    prompt_length: int
    think_end: int
    copies: dict[int, list[int]]
    reads: list[tuple[int, int]]

    @classmethod
    def from_problem(cls, problem: Problem) -> TrainingSequence:
        prompt = [BOS] + encode_words(problem.prompt)
        completion = encode_words(problem.completion)
        offset = len(prompt)
        return cls(
            ids=prompt + completion + [EOS],
            prompt_length=offset,
            think_end=offset + completion.index(THINK_END_ID),
            copies={save: [offset + p for p in positions] for save, positions in problem.value_copies.items()},
            reads=[(offset + position, save) for position, save in problem.value_reads],
        )


def draw_config(rng: random.Random, steps: tuple[int, int], families: tuple[str, ...]) -> TaskConfig:
    """A training problem's config: a family of ``families`` (and a re-read period), a step count in ``steps``,
    any number of saves and any noise level, uniformly."""
    family = rng.choice(families)
    reuse_every = rng.choice(REUSE_PERIODS) if family == "reuse" else None
    draw = rng.randint(*steps)
    return TaskConfig(steps=draw, saves=rng.randint(1, min(MAX_SAVES, draw)), noise=rng.randint(0, MAX_NOISE),
                      family=family, reuse_every=reuse_every)


class ProblemBatches(torch.utils.data.IterableDataset):
    """Endless batches of about ``batch_tokens`` tokens; batch ``i`` uses step bucket ``i mod len(buckets)``, each
    problem a family drawn from ``families``.

    A batch holds ``input_ids`` (right-padded), ``weights`` (per predicted token: 0 on prompt and padding,
    ``retrieval_weight`` on the answer and on copies of saved values, 1 elsewhere; 0 on reads that a masked row
    hides every copy of) and, for masked batches, ``visible_key`` (which keys stay visible beyond the window)
    and ``window``. Each DataLoader worker draws from its own seeded generator; the loader interleaves workers
    in turn, so the stream is fixed by (seed, workers).
    """

    def __init__(self, seed: int, batch_tokens: int, buckets: tuple[tuple[int, int], ...],
                 retrieval_weight: float = 1.0, augmentation: Augmentation = Augmentation(),
                 families: tuple[str, ...] = FAMILIES):
        self.seed, self.batch_tokens, self.buckets = seed, batch_tokens, buckets
        self.retrieval_weight, self.augmentation, self.families = retrieval_weight, augmentation, families

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"train-{self.seed}-{worker}")
        index = worker
        while True:
            yield self.make_batch(rng, self.buckets[index % len(self.buckets)], may_mask=index >= self.augmentation.start_batch)
            index += workers

    def make_batch(self, rng: random.Random, steps: tuple[int, int], may_mask: bool = True) -> dict[str, torch.Tensor]:
        sequences: list[TrainingSequence] = []
        longest = 0
        while True:
            sequence = TrainingSequence.from_problem(generate_problem(rng, draw_config(rng, steps, self.families)))
            if sequences and max(longest, len(sequence.ids)) * (len(sequences) + 1) > self.batch_tokens:
                break
            sequences.append(sequence)
            longest = max(longest, len(sequence.ids))
        rows = len(sequences)
        longest = -(-longest // 16) * 16  # a multiple of 16 keeps the attention mask aligned for fused kernels
        input_ids = torch.full((rows, longest), PAD, dtype=torch.long)
        # weights[r, k] weighs the prediction of token k + 1 from position k.
        weights = torch.zeros((rows, longest), dtype=torch.float32)
        for row, sequence in enumerate(sequences):
            end = len(sequence.ids)
            input_ids[row, :end] = torch.tensor(sequence.ids)
            weights[row, sequence.prompt_length - 1 : end - 1] = 1.0
            weights[row, sequence.think_end : end - 1] = self.retrieval_weight
            for positions in sequence.copies.values():
                weights[row, [position - 1 for position in positions]] = self.retrieval_weight
        batch = {"input_ids": input_ids, "weights": weights}
        augmentation = self.augmentation
        if augmentation.fraction and rng.random() < augmentation.fraction and may_mask:
            visible = torch.zeros((rows, longest), dtype=torch.bool)
            window = torch.zeros((rows, 1, 1, 1), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                probability = rng.uniform(*augmentation.keep_probability)
                visible[row] = torch.rand(longest, generator=torch.Generator().manual_seed(rng.getrandbits(62))) < probability
                visible[row, : sequence.prompt_length] = True
                hide = rng.uniform(*augmentation.hide_copy_probability)
                kept_copy = {position: rng.random() >= hide for positions in sequence.copies.values() for position in positions}
                visible[row, list(kept_copy)] = torch.tensor(list(kept_copy.values()))
                row_window = rng.randint(*augmentation.window)
                window[row] = row_window
                for position, save in sequence.reads:
                    # The query predicting `position` needs a copy written before it, kept or within its window
                    # (the rule of attention_mask_for).
                    query = position - 1
                    if not any(copy <= query and (kept_copy[copy] or query - copy < row_window) for copy in sequence.copies[save]):
                        weights[row, query] = 0.0
            batch["visible_key"] = visible
            batch["window"] = window
        return batch


def attention_mask_for(batch: dict[str, torch.Tensor], device: str) -> torch.Tensor | None:
    """The 4D boolean mask (True = attend) of a masked batch: causal, and beyond the window only visible keys.

    Unmasked batches return None: right padding under a causal mask needs no mask (real tokens never attend
    to later pads).
    """
    if "visible_key" not in batch:
        return None
    visible = batch["visible_key"].to(device, non_blocking=True)
    window = batch["window"].to(device, non_blocking=True)
    length = visible.shape[1]
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]  # query - key
    causal = distance >= 0
    near = distance < window  # [rows, 1, L, L]
    return causal & (near | visible[:, None, None, :])


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """``"4-40,40-80"`` -> ((4, 40), (40, 80)); each range within 1..MAX_STEPS."""
    buckets = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= MAX_STEPS):
            raise argparse.ArgumentTypeError(f"bucket {part!r}: expected LOW-HIGH with 1 <= LOW <= HIGH <= {MAX_STEPS}")
        buckets.append((int(low), int(high)))
    return tuple(buckets)


def parse_families(text: str) -> tuple[str, ...]:
    """``"dormant,reuse"`` -> ("dormant", "reuse"); each one of the task's FAMILIES, none twice."""
    families = tuple(text.split(","))
    unknown = [family for family in families if family not in FAMILIES]
    if unknown or len(set(families)) != len(families):
        raise argparse.ArgumentTypeError(f"families {text!r}: expected distinct names among {FAMILIES}")
    return families


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Any, lr: float, weight_decay: float, device: str) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")


def batch_loss(model: Any, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """Weighted next-token cross-entropy (weights as in ``ProblemBatches``)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    weights = batch["weights"].to(device, non_blocking=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask_for(batch, device)).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    weights = weights[:, :-1].reshape(-1)
    return (losses * weights).sum() / weights.sum()


def train_step(model: Any, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, device: str) -> torch.Tensor:
    loss = batch_loss(model, batch, device)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def describe(config: TaskConfig) -> str:
    """A short name of a config for logs: ``reuse r2 steps 32-40 saves 6 noise 3``."""
    low, high = config.step_range
    family = f"reuse r{config.reuse_every}" if config.family == "reuse" else config.family
    return f"{family} steps {low}-{high} saves {config.saves} noise {config.noise}"


@torch.no_grad()
def full_cache_accuracy(model: Any, tokenizer: Any, config: TaskConfig, count: int, batch_size: int, device: str) -> dict[str, Any]:
    """Greedy full-cache accuracy (exact match and per save) on ``count`` held-out problems of ``config``
    (plain HF generate)."""
    from dynts.evals.grading import get_grader

    grader = get_grader("synthetic")
    problems = generate_problems(count, HELDOUT_SEED, config)
    correct, credit, trace_lengths, new_tokens = 0, 0.0, [], 0
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        chunk = problems[first : first + batch_size]
        inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)
        limit = max(len(p.completion.split()) for p in chunk) + 64
        output = model.generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = output[:, inputs["input_ids"].shape[1] :]
        for problem, ids in zip(chunk, generated):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            extracted = grader.extract(text)
            correct += grader.is_correct(extracted, problem.answer)
            credit += grader.partial_credit(extracted, problem.answer)
            words = text.split()
            trace_lengths.append(words.index(THINK_END) if THINK_END in words else len(words))
            new_tokens += int((ids != tokenizer.pad_token_id).sum())
    return {
        "config": asdict(config),
        "problems": count,
        "accuracy": correct / count,
        "per_save_accuracy": credit / count,
        "mean_trace_tokens": statistics.mean(trace_lengths),
        "seconds": round(time.perf_counter() - start, 1),
        "new_tokens": new_tokens,
    }


@torch.no_grad()
def teacher_forced_accuracy(model: Any, config: TaskConfig, count: int, device: str, window: int | None,
                            latest_copies_only: bool = False, batch_size: int = 16) -> float:
    """Share of held-out problems the model predicts token by token, from one forward pass each.

    window None: the whole completion, full context (a lower bound of greedy accuracy: a wrong dead-end digit
    fails it, not the answer). With ``window``, each query sees only the prompt, copies of saved values and its
    last ``window`` tokens: the cache of an ideal scorer, so this measures whether the model copes with
    evictions. ``latest_copies_only`` keeps only the last copy of each save (restatements and re-reads instead
    of the originals) and scores only the answer, which then has no other source: whether any correct copy
    is usable.
    """
    problems = generate_problems(count, HELDOUT_SEED, config)
    correct = 0
    for first in range(0, count, batch_size):
        sequences = [TrainingSequence.from_problem(problem) for problem in problems[first : first + batch_size]]
        length = max(len(sequence.ids) for sequence in sequences)
        input_ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
        visible = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence.ids)] = torch.tensor(sequence.ids)
            visible[row, : sequence.prompt_length] = True
            for positions in sequence.copies.values():
                visible[row, positions[-1:] if latest_copies_only else positions] = True
        batch = {"input_ids": input_ids}
        if window is not None:
            batch.update(visible_key=visible, window=torch.full((len(sequences), 1, 1, 1), window))
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask_for(batch, device)).logits
        predicted = logits.argmax(-1).cpu()
        for row, sequence in enumerate(sequences):
            first_scored = sequence.think_end if latest_copies_only else sequence.prompt_length
            end = len(sequence.ids)
            correct += bool((predicted[row, first_scored - 1 : end - 1] == input_ids[row, first_scored:end]).all())
    return correct / count


PROXY_WINDOW = 64


def proxy_report(model: Any, config: TaskConfig, count: int, device: str) -> dict[str, float]:
    """The teacher-forced checks of ``config``: full context, an ideal cache, and the latest copies only."""
    return {
        "full_context": teacher_forced_accuracy(model, config, count, device, window=None),
        "ideal_cache": teacher_forced_accuracy(model, config, count, device, window=PROXY_WINDOW),
        "latest_copies_answer": teacher_forced_accuracy(model, config, count, device, window=PROXY_WINDOW,
                                                        latest_copies_only=True),
    }


def format_proxy(config: TaskConfig, count: int, proxy: dict[str, float]) -> str:
    return (f"teacher-forced on {count} problems ({describe(config)}): full context {proxy['full_context']:.4f}, "
            f"ideal cache (prompt + copies + last {PROXY_WINDOW}) {proxy['ideal_cache']:.4f}, "
            f"answer from the latest copy of each save {proxy['latest_copies_answer']:.4f}")


def write_predictor_problems(path: Path, count: int, seed: int, families: tuple[str, ...]) -> None:
    """``count`` problems for ``dynts label --data`` (fields ``problem`` and ``answer``), cycling through the
    default config of every family and re-read period."""
    if seed == EVAL_SEED:
        raise ValueError(f"predictor problems must not use the evaluation seed {EVAL_SEED}")
    variants = family_variants(families)
    rng = random.Random(f"predictor-{seed}")
    with open(path, "w") as handle:
        for index in range(count):
            config = variants[index % len(variants)]
            problem = generate_problem(rng, config)
            record = {"problem": problem.prompt, "answer": problem.answer, "family": config.family,
                      "reuse_every": config.reuse_every}
            handle.write(json.dumps(record) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for the checkpoint, tokenizer, log, summary and predictor problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the problem stream")
    parser.add_argument("--steps", default="auto", help="optimizer steps, or 'auto': measure speed, fit --time-budget")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds of training for --steps auto")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per batch (padding included)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the weight matrices")
    parser.add_argument("--retrieval-weight", type=float, default=4.0,
                        help="loss weight of the answer tokens and of copies of saved values (the long-range retrievals)")
    parser.add_argument("--families", type=parse_families, default=FAMILIES,
                        help=f"task families of the training mixture, drawn uniformly per problem (default: {','.join(FAMILIES)})")
    parser.add_argument("--augment", type=float, default=0.0,
                        help="fraction of batches trained under eviction-like key masking (see Augmentation)")
    parser.add_argument("--augment-start", type=float, default=0.0,
                        help="fraction of the steps trained unmasked before --augment starts")
    parser.add_argument("--hide-copies", type=float, default=Augmentation.hide_copy_probability[1],
                        help="masked rows hide each copy of a saved value with a probability drawn from [0, this]")
    parser.add_argument("--max-train-seconds", type=float, default=None,
                        help="stop training early (logged) if it runs this long; default: 1.25 x --time-budget with "
                             "--steps auto, else no limit")
    parser.add_argument("--warmup", type=float, default=0.04, help="warm-up as a fraction of the steps")
    parser.add_argument("--buckets", type=parse_buckets, default=STEP_BUCKETS,
                        help="step-count ranges of the batches, e.g. 4-40,40-80 (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=3, help="data-generating worker processes")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from a saved checkpoint (fine-tuning) instead of a fresh model")
    parser.add_argument("--hidden-size", type=int, default=ModelShape.hidden_size, help="model width")
    parser.add_argument("--layers", type=int, default=ModelShape.layers, help="decoder layers")
    parser.add_argument("--intermediate-size", type=int, default=ModelShape.intermediate_size, help="SwiGLU width")
    parser.add_argument("--eval-problems", type=int, default=256,
                        help="held-out problems per family (and re-read period) for full-cache accuracy")
    parser.add_argument("--eval-steps", type=parse_buckets, default=None,
                        help="step range of the held-out sets, e.g. 44-56 (default: each family's default)")
    parser.add_argument("--eval-saves", type=int, default=None, help="saves of the held-out sets")
    parser.add_argument("--eval-batch", type=int, default=256, help="rows per generate call of the held-out evaluation")
    parser.add_argument("--proxy-problems", type=int, default=128,
                        help="held-out problems of the teacher-forced checks (full context, ideal cache, latest copies)")
    parser.add_argument("--proxy-every", type=int, default=0, help="run the teacher-forced checks every N steps (0: at the end)")
    parser.add_argument("--eval-budget", type=float, default=150.0,
                        help="seconds for the optional --sweep evaluations (the per-family ones always run)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate other lengths / saves / noise levels (dormant) while --eval-budget allows")
    parser.add_argument("--predictor-problems", type=int, default=200,
                        help="problems written to OUT/predictor_problems.jsonl for `dynts label --data`")
    parser.add_argument("--predictor-seed", type=int, default=7, help="seed of the predictor problems (not the evaluation seed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range arguments with a message naming the flag and its range."""
    if not 0.0 <= args.augment <= 1.0:
        raise UsageError(f"--augment must be in [0, 1], got {args.augment}")
    if not 0.0 <= args.augment_start < 1.0:
        raise UsageError(f"--augment-start must be in [0, 1), got {args.augment_start}")
    if not 0.0 <= args.hide_copies <= 1.0:
        raise UsageError(f"--hide-copies must be in [0, 1], got {args.hide_copies}")
    if args.retrieval_weight <= 0:
        raise UsageError(f"--retrieval-weight must be > 0, got {args.retrieval_weight}")
    if args.steps != "auto" and (not args.steps.isdigit() or int(args.steps) < 1):
        raise UsageError(f"--steps must be a positive int or 'auto', got {args.steps!r}")
    if args.predictor_seed == EVAL_SEED:
        raise UsageError(f"--predictor-seed must not be the evaluation seed {EVAL_SEED}")
    for name, low in (("batch_tokens", 1), ("workers", 0), ("eval_problems", 0), ("eval_batch", 1),
                      ("proxy_problems", 1), ("proxy_every", 0), ("predictor_problems", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train_log.txt", "w")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    arguments = {name: (str(value) if isinstance(value, Path) else value) for name, value in vars(args).items()}
    log(f"arguments: {json.dumps(arguments)}")
    device = args.device
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        log(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    shape = ModelShape(hidden_size=args.hidden_size, layers=args.layers, intermediate_size=args.intermediate_size)
    augmentation_settings = dict(fraction=args.augment, hide_copy_probability=(0.0, args.hide_copies))

    def fresh(augment_start_batch: int) -> tuple[Any, torch.optim.Optimizer, Iterator[dict[str, torch.Tensor]]]:
        if args.init_from is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        else:
            model = build_model(shape, args.seed).to(device)
        optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
        loader = torch.utils.data.DataLoader(
            ProblemBatches(args.seed, args.batch_tokens, args.buckets, args.retrieval_weight,
                           Augmentation(**augmentation_settings, start_batch=augment_start_batch), args.families),
            batch_size=None,
            num_workers=args.workers,
            pin_memory=device == "cuda",
            prefetch_factor=4 if args.workers else None,
            persistent_workers=False,
        )
        return model, optimizer, iter(loader)

    # The probe masks from its first batch (the slower regime), so the step count it picks errs on the short side.
    model, optimizer, batches = fresh(0 if args.steps == "auto" else int(args.augment_start * int(args.steps)))
    parameters = sum(p.numel() for p in model.parameters())
    if args.init_from is not None:
        text_config = model.config
        shape = ModelShape(text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads,
                           text_config.num_key_value_heads, text_config.intermediate_size, text_config.max_position_embeddings)
        if text_config.vocab_size != len(VOCAB):
            raise UsageError(f"--init-from {args.init_from}: vocabulary of {text_config.vocab_size} tokens, the task has {len(VOCAB)}")
        log(f"init from {args.init_from}")
    log(f"model: llama {asdict(shape)} parameters {parameters:,} vocab {len(VOCAB)}; families {','.join(args.families)}")

    if args.steps == "auto":
        # Time a few steps of every bucket (after a warm-up), then train from scratch with a fixed step count.
        probe_steps = 8 * len(args.buckets)
        for _ in range(4 * len(args.buckets)):  # warm-up: kernel selection, allocator growth, loader start
            train_step(model, next(batches), optimizer, device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(probe_steps):
            loss = train_step(model, next(batches), optimizer, device)
        float(loss)
        per_step = (time.perf_counter() - start) / probe_steps
        total_steps = max(1, int(args.time_budget / (per_step * 1.08)))
        log(f"probe: {per_step * 1000:.1f} ms/step -> --steps {total_steps} for a {args.time_budget:.0f} s budget")
        del model, optimizer, batches
        model, optimizer, batches = fresh(int(args.augment_start * total_steps))
    else:
        total_steps = int(args.steps)
    warmup = max(1, int(args.warmup * total_steps))
    log(f"train: steps {total_steps} warmup {warmup} peak lr {args.lr} batch tokens {args.batch_tokens} seed {args.seed}")

    eval_configs = [
        TaskConfig(family=variant.family, reuse_every=variant.reuse_every,
                   steps=args.eval_steps[0] if args.eval_steps else None, saves=args.eval_saves or variant.saves)
        for variant in family_variants(args.families)
    ]
    model.train()
    start = time.perf_counter()
    time_limit = args.max_train_seconds or (1.25 * args.time_budget if args.steps == "auto" else math.inf)
    seen_tokens, running = 0, []
    for step in range(total_steps):
        if time.perf_counter() - start > time_limit:
            log(f"STOPPED EARLY at step {step} of {total_steps}: training passed {time_limit:.0f} s")
            total_steps = step
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args.lr, warmup)
        batch = next(batches)
        seen_tokens += int((batch["input_ids"] != PAD).sum())
        running.append(train_step(model, batch, optimizer, device))
        if (step + 1) % 100 == 0 or step + 1 == total_steps:
            loss = torch.stack(running).float().mean().item()
            running = []
            elapsed = time.perf_counter() - start
            log(f"step {step + 1:6d} loss {loss:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"tokens {seen_tokens / 1e6:.1f}M {seen_tokens / elapsed / 1e3:.0f}k tok/s elapsed {elapsed:.0f}s")
        if args.proxy_every and (step + 1) % args.proxy_every == 0 and step + 1 < total_steps:
            model.eval()
            for config in eval_configs:
                log(f"step {step + 1:6d} {format_proxy(config, args.proxy_problems, proxy_report(model, config, args.proxy_problems, device))}")
            model.train()
    train_seconds = time.perf_counter() - start
    del batches

    # Save: fp32 if it fits the size limit, else fp16 (the GitHub-safe 15 MB cap of a shipped checkpoint).
    model.eval()
    tokenizer = build_tokenizer()
    dtype = torch.float32 if parameters * 4 < MAX_CHECKPOINT_BYTES - 100_000 else torch.float16
    model.to(dtype).save_pretrained(args.out, safe_serialization=True)
    model.generation_config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    size = (args.out / "model.safetensors").stat().st_size
    log(f"saved {args.out} ({size / 1e6:.2f} MB, {dtype}) after {train_seconds:.0f} s of training")
    if size > MAX_CHECKPOINT_BYTES:
        log(f"ERROR: checkpoint is {size} bytes, over the {MAX_CHECKPOINT_BYTES}-byte limit")
        return 1
    if args.predictor_problems:
        write_predictor_problems(args.out / "predictor_problems.jsonl", args.predictor_problems, args.predictor_seed, args.families)
        log(f"wrote {args.predictor_problems} predictor problems (seed {args.predictor_seed}) to {args.out / 'predictor_problems.jsonl'}")

    # Held-out accuracy of the saved files, loaded back in fp32 as users load them.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    proxies = {}
    for config in eval_configs:
        proxies[describe(config)] = proxy_report(model, config, args.proxy_problems, device)
        log(f"held-out {format_proxy(config, args.proxy_problems, proxies[describe(config)])}")
    results = []
    if args.eval_problems:
        for config in eval_configs:
            result = full_cache_accuracy(model, tokenizer, config, args.eval_problems, args.eval_batch, device)
            results.append(result)
            log(f"held-out full-cache accuracy {result['accuracy']:.4f} (per save {result['per_save_accuracy']:.4f}) on "
                f"{args.eval_problems} problems ({describe(config)}), mean trace {result['mean_trace_tokens']:.0f} tokens "
                f"({result['seconds']} s)")
    if args.sweep and results:
        sweep_start = time.perf_counter()
        # Time per generated token so far predicts a config's time; skip what does not fit the budget.
        per_token = sum(r["seconds"] for r in results) / max(1, sum(r["new_tokens"] for r in results))
        count = max(1, args.eval_problems // 2)
        for config in (TaskConfig(steps=(12, 20), saves=4, noise=1), TaskConfig(steps=(90, 110), saves=8, noise=5),
                       TaskConfig(steps=(140, MAX_STEPS), saves=8, noise=3)):
            expected = per_token * count * statistics.mean(p.trace_length for p in generate_problems(8, 1, config))
            if time.perf_counter() - sweep_start + expected > args.eval_budget:
                log(f"eval skipped (eval budget): {describe(config)}")
                continue
            result = full_cache_accuracy(model, tokenizer, config, count, args.eval_batch, device)
            results.append(result)
            log(f"held-out full-cache accuracy {result['accuracy']:.4f} (per save {result['per_save_accuracy']:.4f}) on "
                f"{count} problems ({describe(config)}), mean trace {result['mean_trace_tokens']:.0f} tokens ({result['seconds']} s)")
    summary = {
        "seed": args.seed,
        "steps": total_steps,
        "augment": args.augment,
        "families": list(args.families),
        "train_seconds": round(train_seconds, 1),
        "train_tokens": seen_tokens,
        "parameters": parameters,
        "shape": asdict(shape),
        "args": arguments,
        "heldout_seed": HELDOUT_SEED,
        "heldout": results,
        "heldout_teacher_forced": proxies,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"summary: {json.dumps(summary)}")
    log(f"rebuild exactly: same command with --steps {total_steps}")
    log_file.close()
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    sys.exit(run_module("dynts.training.reasoner"))
