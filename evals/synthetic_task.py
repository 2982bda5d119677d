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

Token roles:
- decision-critical: the save values (``-> sK v``) and their restatements (``+ sK v`` in a later save);
  they are needed long after they are written, by a later save or by the answer.
- locally needed: the latest state line, step tag and ``next`` pointer (the next step reads them; a local window
  keeps them).
- redundant: the ``wait ... no`` dead ends (the other operation, tried and rejected after every step whose
  result is below the noise level) and the ``check ... ok`` restatements of the state that follow them.

A model cannot compute a save from the prompt in one pass (it depends on the whole run), so the answer has to
be read back from the trace: keeping the wrong tokens, or only a recent window, loses it. Chance level is
10^-saves. The vocabulary is word-level and tiny, so a few-million-parameter decoder learns the task.
"""

from __future__ import annotations

import importlib.resources
import random
import re
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
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS

# Seed of the held-out evaluation problems (the training script draws from other seeds).
EVAL_SEED = 1_000_003
# Defaults of the evaluation suite: about 1,000 thinking tokens per problem (see dynts/assets/reasoner/TRAINING.md).
# At a 25% budget (window 64, keep ratio 0.3) a compaction keeps room for the six saved values beyond the prompt;
# at 15% its quota barely covers the prompt, so no scorer can succeed there.
DEFAULT_STEPS = (36, 44)
DEFAULT_SAVES = 6
DEFAULT_NOISE = 3


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the generator.

    steps: number of machine steps, an int or an inclusive (low, high) range drawn per problem; the trace
           has about 20 + 1.4 * noise tokens per step (1,000 tokens at 40 steps and noise 3, 4,000 at 160).
    saves: how many results the answer needs (the needed facts), 1..MAX_SAVES; at most the number of steps.
    noise: distractor level 0..MAX_NOISE: after every step whose result is below ``noise`` the trace tries
           the other operation (a dead end) and re-checks the state.
    """

    steps: int | tuple[int, int] = DEFAULT_STEPS
    saves: int = DEFAULT_SAVES
    noise: int = DEFAULT_NOISE

    def __post_init__(self) -> None:
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
    """One generated problem. ``prompt`` ends with ``<think>``; ``completion`` is trace + ``</think>`` + answer."""

    prompt: str
    completion: str
    answer: str
    # Word indices into ``completion.split()`` of the decision-critical tokens (save values and restatements).
    critical_positions: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def trace_length(self) -> int:
        """Number of thinking tokens (between ``<think>`` and ``</think>``)."""
        return self.completion.split().index(THINK_END)


def _apply(operation: str, left: int, right: int) -> int:
    return (left + right) % 10 if operation == "+" else (left - right) % 10


def generate_problem(rng: random.Random, config: TaskConfig = TaskConfig()) -> Problem:
    """Draw one problem from ``rng`` (a seeded ``random.Random``)."""
    steps = rng.randint(*config.step_range)
    state = [rng.randrange(10) for _ in REGISTERS]
    while not any(state):  # an all-zero start stays at zero under + and -
        state = [rng.randrange(10) for _ in REGISTERS]
    operations = [rng.choice(OPERATIONS) for _ in REGISTERS]
    save_steps = sorted(rng.sample(range(1, steps), config.saves - 1)) + [steps]

    prompt_words: list[str] = []
    for register, value, operation in zip(REGISTERS, state, operations):
        prompt_words += [register, str(value), operation]
    prompt_words.append(f"n{config.noise}")
    for index, step in enumerate(save_steps, start=1):
        prompt_words += [f"s{index}", f"t{step}"]
    prompt_words.append(THINK_START)

    words: list[str] = ["next", "s1", f"t{save_steps[0]}"]
    critical: list[int] = []
    saved: list[int] = []
    dead_ends = 0

    def state_words() -> list[str]:
        return [w for register, value in zip(REGISTERS, state) for w in (register, str(value))]

    for step in range(1, steps + 1):
        target = (step - 1) % len(REGISTERS)
        source = step % len(REGISTERS)
        operation = operations[target]
        left, right = state[target], state[source]
        result = _apply(operation, left, right)
        state[target] = result
        words += [f"t{step}", REGISTERS[target], operation, REGISTERS[source], ":"]
        words += [str(left), operation, str(right), "=", str(result), "|", *state_words()]
        if result < config.noise:
            other = "-" if operation == "+" else "+"
            words += ["wait", str(left), other, str(right), "=", str(_apply(other, left, right)), "no"]
            words += ["check", *state_words(), "ok"]
            dead_ends += 1
        if step in save_steps:
            index = len(saved) + 1
            words += ["save", str(result)]
            value = result
            if index >= 3:
                earlier = saved[index - 3]
                words += ["+", f"s{index - 2}"]
                critical.append(len(words))
                words += [str(earlier)]
                value = (result + earlier) % 10
                words += ["=", str(value)]
            words += ["->", f"s{index}"]
            critical.append(len(words))
            words.append(str(value))
            saved.append(value)
        if step < steps:
            words += ["next", f"s{len(saved) + 1}", f"t{save_steps[len(saved)]}"]

    words.append(THINK_END)
    for index, value in enumerate(saved, start=1):
        words += [f"s{index}", str(value)]
    return Problem(
        prompt=" ".join(prompt_words),
        completion=" ".join(words),
        answer=" ".join(str(value) for value in saved),
        critical_positions=critical,
        meta={"steps": steps, "saves": config.saves, "noise": config.noise, "dead_ends": dead_ends},
    )


def generate_problems(count: int, seed: int, config: TaskConfig = TaskConfig()) -> list[Problem]:
    """``count`` problems from a fixed seed (same seed, same problems)."""
    rng = random.Random(seed)
    return [generate_problem(rng, config) for _ in range(count)]


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
    """A scorer that knows the task: 1 for the decision-critical tokens (a digit right after a save label
    ``sK``: save values and their restatements), 0 for every other token. An upper bound for learned scorers,
    and a check that the task can be solved at a given budget."""
    import torch

    from dynts.scorers import ExternalScorer

    save_label_ids = torch.tensor([_WORD_IDS[f"s{index}"] for index in range(1, MAX_SAVES + 1)])
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
