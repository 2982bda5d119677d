"""Train the tiny reasoner that ships with the package (``dynts/assets/reasoner``).

A Llama-architecture decoder (about 3.6M parameters) learns the synthetic register-machine task
(``synthetic_task.py``) from freshly generated problems: loss on the trace and the answer only, bf16 autocast
on CUDA, AdamW with warm-up and cosine decay, a fixed seed. At the end it saves the checkpoint (safetensors)
and tokenizer, reloads them in fp32 and measures full-cache greedy accuracy on held-out problems.

The shipped model was built on one H100 with (the run used ``--steps auto``, which timed a probe and chose
2060 steps; ``--steps 2060`` replays it):

    python -m dynts.training.reasoner --out dynts/assets/reasoner --seed 0 --steps 2060 \
        --augment 0.5 --augment-start 0.3 --eval-budget 70 --eval-batch 512 --workers 6 \
        --proxy-problems 256 --proxy-every 1000

``--augment`` trains part of the batches under eviction-like key masking, so the model copes with evicted
redundant tokens; ``dynts/assets/reasoner/TRAINING.md`` has the log and the accuracies. This module and
``synthetic_task.py`` import nothing else from dynts, so they run from a bare copy of the two files.
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
from dynts.evals.synthetic_task import (
    EVAL_SEED,
    MAX_NOISE,
    MAX_SAVES,
    MAX_STEPS,
    THINK_END,
    VOCAB,
    TaskConfig,
    build_tokenizer,
    encode_words,
    extract_answer,
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
    max_positions: int = 5120


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


@dataclass(frozen=True)
class Augmentation:
    """Eviction-like key masking on a fraction of batches, so the model does not lean on redundant tokens.

    In a masked batch each row draws a window ``W`` and a keep probability ``p``; a key is visible to a query
    while it is among the query's last ``W`` tokens, and after that only if it is protected (prompt), critical
    (a save value or its restatement) or kept by a coin of probability ``p``: what a cache that keeps the right
    tokens plus some random others would show the model. Critical and prompt tokens are never hidden, so the
    model learns no way around losing them.
    """

    fraction: float = 0.0
    window: tuple[int, int] = (40, 192)
    keep_probability: tuple[float, float] = (0.0, 0.5)
    start_batch: int = 0  # batches before this index are never masked (learn the task first)


def training_sequence(rng: random.Random, steps: tuple[int, int]) -> tuple[list[int], int, list[int], int]:
    """One training problem: token ids (bos + prompt + completion + eos), the prompt length (no loss), the
    sequence indices of its critical tokens, and the index of ``</think>``."""
    low, high = steps
    draw = rng.randint(low, high)
    config = TaskConfig(steps=draw, saves=rng.randint(1, min(MAX_SAVES, draw)), noise=rng.randint(0, MAX_NOISE))
    problem = generate_problem(rng, config)
    prompt = [BOS] + encode_words(problem.prompt)
    completion = encode_words(problem.completion)
    critical = [len(prompt) + position for position in problem.critical_positions]
    think_end = len(prompt) + completion.index(THINK_END_ID)
    return prompt + completion + [EOS], len(prompt), critical, think_end


class ProblemBatches(torch.utils.data.IterableDataset):
    """Endless batches of about ``batch_tokens`` tokens; batch ``i`` uses step bucket ``i mod len(buckets)``.

    A batch holds ``input_ids`` (right-padded), ``weights`` (per predicted token: 0 on prompt and padding,
    ``retrieval_weight`` on the answer and on restated saves, 1 elsewhere) and, for masked batches,
    ``visible_key`` (which keys stay visible beyond the window) and ``window``. Each DataLoader worker draws
    from its own seeded generator; the loader interleaves workers in turn, so the stream is fixed by
    (seed, workers).
    """

    def __init__(self, seed: int, batch_tokens: int, buckets: tuple[tuple[int, int], ...],
                 retrieval_weight: float = 1.0, augmentation: Augmentation = Augmentation()):
        self.seed, self.batch_tokens, self.buckets = seed, batch_tokens, buckets
        self.retrieval_weight, self.augmentation = retrieval_weight, augmentation

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"train-{self.seed}-{worker}")
        index = worker
        while True:
            yield self.make_batch(rng, self.buckets[index % len(self.buckets)], may_mask=index >= self.augmentation.start_batch)
            index += workers

    def make_batch(self, rng: random.Random, steps: tuple[int, int], may_mask: bool = True) -> dict[str, torch.Tensor]:
        sequences = []
        longest = 0
        while True:
            sequence = training_sequence(rng, steps)
            if sequences and max(longest, len(sequence[0])) * (len(sequences) + 1) > self.batch_tokens:
                break
            sequences.append(sequence)
            longest = max(longest, len(sequence[0]))
        rows = len(sequences)
        longest = -(-longest // 16) * 16  # a multiple of 16 keeps the attention mask aligned for fused kernels
        input_ids = torch.full((rows, longest), PAD, dtype=torch.long)
        # weights[r, k] weighs the prediction of token k + 1 from position k.
        weights = torch.zeros((rows, longest), dtype=torch.float32)
        for row, (ids, prompt_len, critical, think_end) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            weights[row, prompt_len - 1 : len(ids) - 1] = 1.0
            weights[row, think_end : len(ids) - 1] = self.retrieval_weight
            for position in critical:
                weights[row, position - 1] = self.retrieval_weight
        batch = {"input_ids": input_ids, "weights": weights}
        augmentation = self.augmentation
        if augmentation.fraction and rng.random() < augmentation.fraction and may_mask:
            visible = torch.zeros((rows, longest), dtype=torch.bool)
            window = torch.zeros((rows, 1, 1, 1), dtype=torch.long)
            for row, (_, prompt_len, critical, _) in enumerate(sequences):
                probability = rng.uniform(*augmentation.keep_probability)
                visible[row] = torch.rand(longest, generator=torch.Generator().manual_seed(rng.getrandbits(62))) < probability
                visible[row, :prompt_len] = True
                visible[row, critical] = True
                window[row] = rng.randint(*augmentation.window)
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


@torch.no_grad()
def full_cache_accuracy(model: Any, tokenizer: Any, config: TaskConfig, count: int, batch_size: int, device: str) -> dict[str, Any]:
    """Greedy full-cache accuracy on ``count`` held-out problems of ``config`` (plain HF generate)."""
    problems = generate_problems(count, HELDOUT_SEED, config)
    correct, trace_lengths, new_tokens = 0, [], 0
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        chunk = problems[first : first + batch_size]
        inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)
        limit = max(len(p.completion.split()) for p in chunk) + 64
        output = model.generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = output[:, inputs["input_ids"].shape[1] :]
        for problem, ids in zip(chunk, generated):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            correct += extract_answer(text) == problem.answer
            words = text.split()
            trace_lengths.append(words.index(THINK_END) if THINK_END in words else len(words))
            new_tokens += int((ids != tokenizer.pad_token_id).sum())
    return {
        "config": asdict(config),
        "problems": count,
        "accuracy": correct / count,
        "mean_trace_tokens": statistics.mean(trace_lengths),
        "seconds": round(time.perf_counter() - start, 1),
        "new_tokens": new_tokens,
    }


@torch.no_grad()
def teacher_forced_exact_match(model: Any, config: TaskConfig, count: int, device: str, window: int | None,
                               batch_size: int = 16) -> float:
    """Share of held-out problems whose whole completion the model predicts token by token: a lower bound of
    greedy accuracy (a wrong dead-end digit fails it, not the answer), from one forward pass. With ``window``,
    each query sees only the prompt, the critical tokens and its last ``window`` tokens: the cache of an ideal
    scorer, so this measures whether the model copes with evictions."""
    problems = generate_problems(count, HELDOUT_SEED, config)
    correct = 0
    for first in range(0, count, batch_size):
        chunk = problems[first : first + batch_size]
        sequences = []
        for problem in chunk:
            prompt = [BOS] + encode_words(problem.prompt)
            critical = [len(prompt) + position for position in problem.critical_positions]
            sequences.append((prompt + encode_words(problem.completion) + [EOS], len(prompt), critical))
        length = max(len(ids) for ids, _, _ in sequences)
        input_ids = torch.full((len(chunk), length), PAD, dtype=torch.long)
        visible = torch.zeros((len(chunk), length), dtype=torch.bool)
        for row, (ids, prompt_len, critical) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            visible[row, :prompt_len] = True
            visible[row, critical] = True
        batch = {"input_ids": input_ids}
        if window is not None:
            batch.update(visible_key=visible, window=torch.full((len(chunk), 1, 1, 1), window))
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask_for(batch, device)).logits
        predicted = logits.argmax(-1).cpu()
        for row, (ids, prompt_len, _) in enumerate(sequences):
            correct += bool((predicted[row, prompt_len - 1 : len(ids) - 1] == input_ids[row, prompt_len : len(ids)]).all())
    return correct / count


PROXY_WINDOW = 64


def proxy_report(model: Any, config: TaskConfig, count: int, device: str) -> str:
    full = teacher_forced_exact_match(model, config, count, device, window=None)
    ideal = teacher_forced_exact_match(model, config, count, device, window=PROXY_WINDOW)
    return (f"teacher-forced exact match on {count} problems {asdict(config)}: full context {full:.4f}, "
            f"ideal cache (prompt + critical + last {PROXY_WINDOW}) {ideal:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint, tokenizer and log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="auto", help="optimizer steps, or 'auto': measure speed, fit --time-budget")
    parser.add_argument("--time-budget", type=float, default=320.0, help="seconds of training for --steps auto")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per batch (padding included)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--retrieval-weight", type=float, default=4.0,
                        help="loss weight of the answer tokens and of restated saves (the long-range retrievals)")
    parser.add_argument("--augment", type=float, default=0.0,
                        help="fraction of batches trained under eviction-like key masking (see Augmentation)")
    parser.add_argument("--augment-start", type=float, default=0.0,
                        help="fraction of the steps trained unmasked before --augment starts")
    parser.add_argument("--max-train-seconds", type=float, default=None,
                        help="stop training early (logged) if it runs this long; default: 1.25 x --time-budget with "
                             "--steps auto, else no limit")
    parser.add_argument("--warmup", type=float, default=0.04, help="warm-up as a fraction of the steps")
    parser.add_argument("--buckets", type=parse_buckets, default=STEP_BUCKETS,
                        help="step-count ranges of the batches, e.g. 4-40,40-80 (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=3, help="data-generating worker processes")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from a saved checkpoint (fine-tuning) instead of a fresh model")
    parser.add_argument("--hidden-size", type=int, default=ModelShape.hidden_size)
    parser.add_argument("--layers", type=int, default=ModelShape.layers)
    parser.add_argument("--intermediate-size", type=int, default=ModelShape.intermediate_size)
    parser.add_argument("--eval-problems", type=int, default=512, help="held-out problems of the default config")
    parser.add_argument("--eval-steps", type=parse_buckets, default=None,
                        help="step range of the main held-out set, e.g. 44-56 (default: the task's default)")
    parser.add_argument("--eval-saves", type=int, default=None, help="saves of the main held-out set")
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--proxy-problems", type=int, default=128,
                        help="held-out problems of the teacher-forced checks (full context, and an ideal cache)")
    parser.add_argument("--proxy-every", type=int, default=0, help="run the teacher-forced checks every N steps (0: at the end)")
    parser.add_argument("--eval-budget", type=float, default=150.0, help="seconds for the held-out evaluations")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate other lengths / saves / noise levels while --eval-budget allows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 0.0 <= args.augment <= 1.0:
        parser.error(f"--augment must be in [0, 1], got {args.augment}")
    if not 0.0 <= args.augment_start < 1.0:
        parser.error(f"--augment-start must be in [0, 1), got {args.augment_start}")
    if args.retrieval_weight <= 0:
        parser.error(f"--retrieval-weight must be > 0, got {args.retrieval_weight}")
    if args.steps != "auto" and (not args.steps.isdigit() or int(args.steps) < 1):
        parser.error(f"--steps must be a positive int or 'auto', got {args.steps!r}")
    for name, low in (("batch_tokens", 1), ("workers", 0), ("eval_problems", 0), ("eval_batch", 1), ("proxy_problems", 1), ("proxy_every", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")

    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train_log.txt", "w")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    log(f"command: python -m dynts.training.reasoner {' '.join(sys.argv[1:] if argv is None else argv)}")
    device = args.device
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        log(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    shape = ModelShape(hidden_size=args.hidden_size, layers=args.layers, intermediate_size=args.intermediate_size)

    def fresh(augment_start_batch: int) -> tuple[Any, torch.optim.Optimizer, Iterator[dict[str, torch.Tensor]]]:
        if args.init_from is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        else:
            model = build_model(shape, args.seed).to(device)
        optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
        loader = torch.utils.data.DataLoader(
            ProblemBatches(args.seed, args.batch_tokens, args.buckets, args.retrieval_weight,
                           Augmentation(args.augment, start_batch=augment_start_batch)),
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
        log(f"init from {args.init_from}")
    log(f"model: llama {asdict(shape)} parameters {parameters:,} vocab {len(VOCAB)}")

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

    main_config = TaskConfig()
    if args.eval_steps or args.eval_saves:
        main_config = TaskConfig(
            steps=args.eval_steps[0] if args.eval_steps else main_config.steps,
            saves=args.eval_saves or main_config.saves,
        )
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
            log(f"step {step + 1:6d} {proxy_report(model, main_config, args.proxy_problems, device)}")
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

    # Held-out accuracy of the saved files, loaded back in fp32 as users load them.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    proxy = proxy_report(model, main_config, args.proxy_problems, device)
    log(f"held-out {proxy}")
    results = []
    eval_start = time.perf_counter()
    configs = [main_config] if args.eval_problems else []
    if args.sweep and args.eval_problems:
        configs += [
            TaskConfig(steps=(12, 20), saves=4, noise=1),
            TaskConfig(steps=(90, 110), saves=8, noise=5),
            TaskConfig(steps=(140, MAX_STEPS), saves=8, noise=3),
        ]
    for index, config in enumerate(configs):
        count = args.eval_problems if index == 0 else args.eval_problems // 2
        spent = time.perf_counter() - eval_start
        if index and results:
            # Time per generated token so far predicts this config's time; skip what does not fit the budget.
            per_token = results[0]["seconds"] / max(1, results[0]["new_tokens"])
            expected = per_token * count * statistics.mean(p.trace_length for p in generate_problems(8, 1, config))
            if spent + expected > args.eval_budget:
                log(f"eval skipped (eval budget): {asdict(config)}")
                continue
        result = full_cache_accuracy(model, tokenizer, config, count, args.eval_batch, device)
        results.append(result)
        log(f"held-out full-cache accuracy {result['accuracy']:.4f} on {count} problems {result['config']} "
            f"mean trace {result['mean_trace_tokens']:.0f} tokens ({result['seconds']} s)")
    summary = {
        "seed": args.seed,
        "steps": total_steps,
        "augment": args.augment,
        "train_seconds": round(train_seconds, 1),
        "train_tokens": seen_tokens,
        "parameters": parameters,
        "shape": asdict(shape),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heldout_seed": HELDOUT_SEED,
        "heldout": results,
        "heldout_teacher_forced": proxy,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"summary: {json.dumps(summary)}")
    log(f"rebuild exactly: same command with --steps {total_steps}")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
