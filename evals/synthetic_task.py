"""A synthetic reasoning task where the choice of kept thinking tokens decides the answer.

A problem describes a tiny register machine; the solution is a long ``<think> ... </think>`` trace that runs
it step by step, followed by an exactly checkable answer. Example (3 steps, 2 saves, noise 5)::

    prompt:  a 3 + b 7 - c 1 + n5 s1 t2 s2 t3 <think>
    trace:   next s1 t2
             t1 a + b : 3 + 7 = 0 | a 0 b 7 c 1
             wait 3 - 7 = 6 no check a 0 b 7 c 1 ok next s1 t2
             t2 b - c : 7 - 1 = 6 | a 0 b 6 c 1 save 6 -> s1 6 next s2 t3
             t3 c + a : 1 + 0 = 1 | a 0 b 6 c 1 wait 1 - 0 = 1 no check a 0 b 6 c 1 ok save 1 -> s2 1
    answer:  </think> s1 6 s2 1

Machine: three registers ``a b c`` hold digits; each has an operation (``+`` or ``-``, modulo 10). Step ``t``
updates register ``i = (t - 1) mod 3`` with register ``i + 1 (mod 3)`` and writes the new state. The prompt
lists the steps whose result is saved; save ``k >= 3`` adds save ``k - 2`` to the result, so the trace itself
needs values written hundreds of tokens earlier, and the answer lists every save. After every step the trace
restates the next save due (``next sK tN``, looked up in the prompt), so whether a step saves is decided from
the last few dozen tokens and the prompt. The trace ends with the step of the last save.

Families (``TaskConfig.family``): the same machine, traced three ways.

- ``dormant`` (the example above): a saved value is read again only by the save two later (``+ sK v``) and by
  the answer; in between it receives about uniform attention, so attention-based scorers cannot see that it
  matters.
- ``reuse`` (``reuse_every = r`` in ``REUSE_PERIODS``; the prompt says ``r2``, ``r5`` or ``r10``): every step
  ``t`` with ``t mod r = 0`` (once a value is saved) re-reads one saved value, in turn over the saves so far,
  and restates it (``read sK v``), as real traces re-read intermediate results. To write ``v`` the model attends
  to a copy of save ``K``, so the copies draw attention while the trace runs. The ``next`` pointer also names
  the save the next re-read restates (``next sK tN read sJ``: ``J`` moves on, in turn, after each re-read).
  Example (5 steps, 3 saves, noise 0, r 2)::

    prompt:  a 9 - b 8 - c 2 + n0 r2 s1 t1 s2 t2 s3 t5 <think>
    trace:   next s1 t1
             t1 a - b : 9 - 8 = 1 | a 1 b 8 c 2 save 1 -> s1 1 next s2 t2 read s1
             t2 b - c : 8 - 2 = 6 | a 1 b 6 c 2 read s1 1 save 6 -> s2 6 next s3 t5 read s2
             t3 c + a : 2 + 1 = 3 | a 1 b 6 c 3 next s3 t5 read s2
             t4 a - b : 1 - 6 = 5 | a 5 b 6 c 3 read s2 6 next s3 t5 read s1
             t5 b - c : 6 - 3 = 3 | a 5 b 3 c 3 save 3 + s1 1 = 4 -> s3 4
    answer:  </think> s1 1 s2 6 s3 4

- ``branches`` (the prompt says ``branch``): after every step whose result is at least ``BRANCH_FROM``, the
  trace explores an abandoned branch: the next ``BRANCH_STEPS`` steps with each register's other operation
  (``try`` ... untagged step lines ...), then ``drop`` and ``back`` + the real state. The branch's values are
  never needed again, yet they are attended while it runs (about a third of a trace's tokens). Example (3
  steps, 2 saves, noise 0)::

    prompt:  a 6 - b 0 - c 4 - n0 branch s1 t2 s2 t3 <think>
    trace:   next s1 t2
             t1 a - b : 6 - 0 = 6 | a 6 b 0 c 4 next s1 t2
             t2 b - c : 0 - 4 = 6 | a 6 b 6 c 4 save 6 -> s1 6 next s2 t3
             t3 c - a : 4 - 6 = 8 | a 6 b 6 c 8
             try a + b : 6 + 6 = 2 | a 2 b 6 c 8 b + c : 6 + 8 = 4 | a 2 b 4 c 8 drop back a 6 b 6 c 8
             save 8 -> s2 8
    answer:  </think> s1 6 s2 8

Token roles (every family):
- decision-critical: every copy of a saved value, i.e. a digit right after a save label: the original
  (``-> sK v``), restatements in a later save (``+ sK v``) and re-reads (``read sK v``). They are needed long
  after they are written, by a later save, a re-read or the answer. The copies of one save are equally correct
  and any one of them suffices (the model is trained with some copies hidden, originals included), so the
  annotation lists them per save (``Problem.value_copies``), and the tokens that read them
  (``Problem.value_reads``): a read needs one copy of its save written before it.
- locally needed: the latest state line (or ``back`` line), step tag and ``next`` pointer (the next step reads
  them; a local window keeps them).
- redundant: the ``wait ... no`` dead ends (the other operation, tried and rejected after every step whose
  result is below the noise level), the ``check ... ok`` restatements of the state that follow them, and the
  abandoned branches (``try ... drop back``) with everything in them.

A model cannot compute a save from the prompt in one pass (it depends on the whole run), so the answer has to
be read back from the trace: keeping the wrong tokens, or only a recent window, loses it. Chance level is
10^-saves. The vocabulary is word-level and tiny, so a few-million-parameter decoder learns the task.
"""

from __future__ import annotations

import importlib.resources
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTERS: tuple[str, ...] = ("a", "b", "c")
OPERATIONS: tuple[str, ...] = ("+", "-")
MAX_STEPS = 160
MAX_SAVES = 8
MAX_NOISE = 5
THINK_START = "<think>"
THINK_END = "</think>"
FAMILIES: tuple[str, ...] = ("dormant", "reuse", "branches")
# Re-read periods of the reuse family. Whether step t re-reads depends only on t mod 10, which the step tag's
# embedding can carry, so the model decides it from the tag and the prompt's r-word alone.
REUSE_PERIODS: tuple[int, ...] = (2, 5, 10)
DEFAULT_REUSE_EVERY = 2
# Branches family: a step whose result is at least BRANCH_FROM (3 results in 10) opens a branch of BRANCH_STEPS
# untagged steps. Two steps keep the state the branch returns to within ~40 tokens, so a 64-token window holds it.
BRANCH_FROM = 7
BRANCH_STEPS = 2
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS: tuple[str, ...] = (
    THINK_START,
    THINK_END,
    *[str(digit) for digit in range(10)],
    *REGISTERS,
    *OPERATIONS,
    ":",
    "=",
    "|",
    "->",
    "wait",
    "no",
    "check",
    "ok",
    "save",
    "next",
    *[f"n{level}" for level in range(10)],
    *[f"s{index}" for index in range(1, MAX_SAVES + 1)],
    *[f"t{step}" for step in range(1, MAX_STEPS + 1)],
    # Words of the reuse and branches families, appended so that the dormant family's token ids never change.
    "read",
    "branch",
    "try",
    "drop",
    "back",
    *[f"r{period}" for period in REUSE_PERIODS],
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS

# Seed of the held-out evaluation problems (the training script draws from other seeds).
EVAL_SEED = 1_000_003
# Defaults of the evaluation suite: about 1,000 thinking tokens per problem in every family (see
# dynts/assets/reasoner/TRAINING.md). At a 25% budget (window 64, keep ratio 0.3) a compaction keeps room for the
# six saved values beyond the prompt; at 15% its quota barely covers the prompt, so no scorer can succeed there.
FAMILY_STEPS: dict[str, tuple[int, int]] = {"dormant": (36, 44), "reuse": (32, 40), "branches": (24, 30)}
DEFAULT_SAVES = 6
DEFAULT_NOISE = 3


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the generator.

    steps: number of machine steps, an int or an inclusive (low, high) range drawn per problem; None: the
           family's default (``FAMILY_STEPS``, about 1,000 thinking tokens). A dormant trace has about
           20 + 1.4 * noise tokens per step (1,000 tokens at 40 steps and noise 3, 4,000 at 160); a reuse trace
           about 3 more, a branches trace about 12 more.
    saves: how many results the answer needs (the needed facts), 1..MAX_SAVES; at most the number of steps.
    noise: distractor level 0..MAX_NOISE: after every step whose result is below ``noise`` the trace tries
           the other operation (a dead end) and re-checks the state.
    family: ``dormant`` (saved values are read only by a later save and the answer), ``reuse`` (every
           ``reuse_every``-th step re-reads a saved value) or ``branches`` (abandoned branches); see the module
           docstring.
    reuse_every: the re-read period r of the reuse family, one of ``REUSE_PERIODS`` (default 2); only for
           ``family="reuse"`` (the dormant family is "never").
    """

    steps: int | tuple[int, int] | None = None
    saves: int = DEFAULT_SAVES
    noise: int = DEFAULT_NOISE
    family: str = "dormant"
    reuse_every: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "reuse":
            if self.reuse_every is None:
                object.__setattr__(self, "reuse_every", DEFAULT_REUSE_EVERY)
            elif self.reuse_every not in REUSE_PERIODS:
                raise ValueError(f"reuse_every must be one of {REUSE_PERIODS}, got {self.reuse_every!r}")
        elif self.reuse_every is not None:
            raise ValueError(f"reuse_every applies only to family 'reuse' (family {self.family!r} never re-reads), "
                             f"got reuse_every={self.reuse_every!r}")
        if self.steps is None:
            object.__setattr__(self, "steps", FAMILY_STEPS[self.family])
        low, high = self.step_range
        if not (1 <= low <= high <= MAX_STEPS):
            raise ValueError(f"steps must be an int or (low, high) with 1 <= low <= high <= {MAX_STEPS}, got {self.steps!r}")
        if not (1 <= self.saves <= MAX_SAVES):
            raise ValueError(f"saves must be in 1..{MAX_SAVES}, got {self.saves}")
        if self.saves > low:
            raise ValueError(f"saves (= {self.saves}) must be <= the smallest number of steps (= {low})")
        if not (0 <= self.noise <= MAX_NOISE):
            raise ValueError(f"noise must be in 0..{MAX_NOISE}, got {self.noise}")

    @property
    def step_range(self) -> tuple[int, int]:
        if isinstance(self.steps, int):
            return (self.steps, self.steps)
        low, high = self.steps
        return (int(low), int(high))


@dataclass
class Problem:
    """One generated problem. ``prompt`` ends with ``<think>``; ``completion`` is trace + ``</think>`` + answer.

    Positions are word indices into ``completion.split()`` (token ``prompt_tokens + index`` of the full sequence,
    where ``prompt_tokens`` counts ``<bos>`` and the prompt's words).
    """

    prompt: str
    completion: str
    answer: str
    # Every copy of a saved value in the trace (the decision-critical tokens), sorted.
    critical_positions: list[int] = field(default_factory=list)
    # Save index -> positions of its copies in the trace (original, restatements, re-reads), sorted. The copies
    # of one save are equally correct: any one of them suffices for every later read of that save.
    value_copies: dict[int, list[int]] = field(default_factory=dict)
    # (position, save index) of every token whose prediction needs a copy of that save written before it:
    # restatements, re-reads and the answer's values.
    value_reads: list[tuple[int, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def trace_length(self) -> int:
        """Number of thinking tokens (between ``<think>`` and ``</think>``)."""
        return self.completion.split().index(THINK_END)


def _apply(operation: str, left: int, right: int) -> int:
    return (left + right) % 10 if operation == "+" else (left - right) % 10


def _other(operation: str) -> str:
    return "-" if operation == "+" else "+"


def _state_words(state: list[int]) -> list[str]:
    return [word for register, value in zip(REGISTERS, state) for word in (register, str(value))]


def _branch_words(state: list[int], operations: list[str], step: int) -> list[str]:
    """An abandoned branch after real step ``step``: the next BRANCH_STEPS steps tried with the other operation
    of each register (untagged lines), dropped, then the real state restated."""
    explored = list(state)
    words = ["try"]
    for offset in range(1, BRANCH_STEPS + 1):
        target = (step + offset - 1) % len(REGISTERS)
        source = (step + offset) % len(REGISTERS)
        operation = _other(operations[target])
        left, right = explored[target], explored[source]
        explored[target] = _apply(operation, left, right)
        words += [REGISTERS[target], operation, REGISTERS[source], ":", str(left), operation, str(right), "="]
        words += [str(explored[target]), "|", *_state_words(explored)]
    return words + ["drop", "back", *_state_words(state)]


def generate_problem(rng: random.Random, config: TaskConfig = TaskConfig()) -> Problem:
    """Draw one problem from ``rng`` (a seeded ``random.Random``).

    Every family draws the same random numbers in the same order, so one seed gives the same machine and save
    schedule in every family (at equal step counts); the dormant family reproduces the original generator.
    """
    steps = rng.randint(*config.step_range)
    state = [rng.randrange(10) for _ in REGISTERS]
    while not any(state):  # an all-zero start stays at zero under + and -
        state = [rng.randrange(10) for _ in REGISTERS]
    operations = [rng.choice(OPERATIONS) for _ in REGISTERS]
    save_steps = sorted(rng.sample(range(1, steps), config.saves - 1)) + [steps]
    reuse_every = config.reuse_every if config.family == "reuse" else None
    branches = config.family == "branches"

    prompt_words: list[str] = []
    for register, value, operation in zip(REGISTERS, state, operations):
        prompt_words += [register, str(value), operation]
    prompt_words.append(f"n{config.noise}")
    if reuse_every is not None:
        prompt_words.append(f"r{reuse_every}")
    if branches:
        prompt_words.append("branch")
    for index, step in enumerate(save_steps, start=1):
        prompt_words += [f"s{index}", f"t{step}"]
    prompt_words.append(THINK_START)

    words: list[str] = ["next", "s1", f"t{save_steps[0]}"]
    copies: dict[int, list[int]] = {}
    reads: list[tuple[int, int]] = []
    saved: list[int] = []
    dead_ends = branch_count = rereads = 0
    read_pointer = 1  # reuse family: the save the next re-read restates (round robin over the saves so far)

    def write_copy(index: int, value: int, is_read: bool) -> None:
        copies.setdefault(index, []).append(len(words))
        if is_read:
            reads.append((len(words), index))
        words.append(str(value))

    for step in range(1, steps + 1):
        target = (step - 1) % len(REGISTERS)
        source = step % len(REGISTERS)
        operation = operations[target]
        left, right = state[target], state[source]
        result = _apply(operation, left, right)
        state[target] = result
        words += [f"t{step}", REGISTERS[target], operation, REGISTERS[source], ":"]
        words += [str(left), operation, str(right), "=", str(result), "|", *_state_words(state)]
        if result < config.noise:
            other = _other(operation)
            words += ["wait", str(left), other, str(right), "=", str(_apply(other, left, right)), "no"]
            words += ["check", *_state_words(state), "ok"]
            dead_ends += 1
        if branches and result >= BRANCH_FROM:
            words += _branch_words(state, operations, step)
            branch_count += 1
        reread = reuse_every is not None and bool(saved) and step % reuse_every == 0
        if reread:
            words += ["read", f"s{read_pointer}"]
            write_copy(read_pointer, saved[read_pointer - 1], is_read=True)
            rereads += 1
        if step in save_steps:
            index = len(saved) + 1
            words += ["save", str(result)]
            value = result
            if index >= 3:
                earlier = saved[index - 3]
                words += ["+", f"s{index - 2}"]
                write_copy(index - 2, earlier, is_read=True)
                value = (result + earlier) % 10
                words += ["=", str(value)]
            words += ["->", f"s{index}"]
            write_copy(index, value, is_read=False)
            saved.append(value)
        if reread:
            read_pointer = read_pointer % len(saved) + 1
        if step < steps:
            words += ["next", f"s{len(saved) + 1}", f"t{save_steps[len(saved)]}"]
            if reuse_every is not None and saved:
                words += ["read", f"s{read_pointer}"]

    words.append(THINK_END)
    for index, value in enumerate(saved, start=1):
        words.append(f"s{index}")
        reads.append((len(words), index))
        words.append(str(value))
    return Problem(
        prompt=" ".join(prompt_words),
        completion=" ".join(words),
        answer=" ".join(str(value) for value in saved),
        critical_positions=sorted(position for positions in copies.values() for position in positions),
        value_copies=copies,
        value_reads=reads,
        meta={"steps": steps, "saves": config.saves, "noise": config.noise, "dead_ends": dead_ends,
              "family": config.family, "reuse_every": reuse_every, "rereads": rereads, "branches": branch_count},
    )


def generate_problems(count: int, seed: int, config: TaskConfig = TaskConfig()) -> list[Problem]:
    """``count`` problems from a fixed seed (same seed, same problems)."""
    rng = random.Random(seed)
    return [generate_problem(rng, config) for _ in range(count)]


def find_value_copies(completion_words: Sequence[str]) -> dict[int, list[int]]:
    """Save index -> positions of the copies of its value in a trace, found by their form alone: a digit right
    after a save label ``sK``, before ``</think>``. On generated problems this equals ``Problem.value_copies``
    (tested); it also annotates what a model actually wrote, whose positions may differ from the reference."""
    end = list(completion_words).index(THINK_END) if THINK_END in completion_words else len(completion_words)
    copies: dict[int, list[int]] = {}
    for position in range(1, end):
        label, word = completion_words[position - 1], completion_words[position]
        if label in _SAVE_LABELS and word.isdigit():
            copies.setdefault(_SAVE_LABELS[label], []).append(position)
    return copies


_SAVE_LABELS = {f"s{index}": index for index in range(1, MAX_SAVES + 1)}
_SAVE_PAIR = re.compile(r"\bs(\d+)\s+(\d)\b")


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the saved digits in order (``"6 1"``), or None if it gives none.

    Reads what follows the last ``</think>`` (the whole text if there is none); the saves must be listed as
    ``s1 v1 s2 v2 ...`` in order, else the answer is malformed (None).
    """
    tail = text.rsplit(THINK_END, 1)[-1]
    pairs = _SAVE_PAIR.findall(tail)
    if not pairs or [int(index) for index, _ in pairs] != list(range(1, len(pairs) + 1)):
        return None
    return " ".join(value for _, value in pairs)


def build_tokenizer() -> Any:
    """The task's word-level tokenizer (a ``PreTrainedTokenizerFast``), built locally: no download.

    Every word of ``VOCAB`` is one token, so ``</think>`` is a single id; ``<bos>`` is prepended to each
    encoded text; padding is on the left, for batched generation.
    """
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


def encode_words(text: str) -> list[int]:
    """Token ids of ``text`` without ``<bos>`` (a fast path for training; same ids as the tokenizer)."""
    return [_WORD_IDS[word] for word in text.split()]


_WORD_IDS = {word: index for index, word in enumerate(VOCAB)}


def bundled_reasoner_path() -> Path:
    """Directory of the tiny reasoner shipped with the package (checkpoint + tokenizer)."""
    return Path(str(importlib.resources.files("dynts") / "assets" / "reasoner"))


def oracle_scorer() -> Any:
    """A scorer that knows the task: 1 for the decision-critical tokens, 0 for every other token. It marks them
    by the form ``find_value_copies`` reads (a digit right after a save label ``sK``: every copy of a saved
    value, in every family), online from the token ids, so it also marks what the model actually wrote. An
    upper bound for learned scorers, and a check that the task can be solved at a given budget."""
    import torch

    from dynts.scorers import ExternalScorer

    save_label_ids = torch.tensor([_WORD_IDS[label] for label in _SAVE_LABELS])
    digit_ids = torch.tensor([_WORD_IDS[str(digit)] for digit in range(10)])
    previous: dict[str, torch.Tensor] = {}

    def score(hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("the synthetic oracle scorer needs input_ids")
        before = previous.get("ids")
        if before is None or before.shape[0] != input_ids.shape[0]:
            before = torch.full((input_ids.shape[0], 1), -1, dtype=input_ids.dtype, device=input_ids.device)
        preceding = torch.cat([before, input_ids[:, :-1]], dim=1)
        previous["ids"] = input_ids[:, -1:]
        critical = torch.isin(input_ids, digit_ids.to(input_ids.device)) & torch.isin(
            preceding, save_label_ids.to(input_ids.device)
        )
        return critical.to(hidden_states.dtype)

    return ExternalScorer(score)
