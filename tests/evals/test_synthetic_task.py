"""The synthetic reasoning task: a correct, deterministic generator whose traces need far-back values."""

from __future__ import annotations

import hashlib
import random
import statistics

import pytest
from dynts.evals.synthetic_task import (
    EVAL_SEED,
    FAMILY_STEPS,
    MAX_NOISE,
    MAX_SAVES,
    MAX_STEPS,
    THINK_END,
    TaskConfig,
    build_tokenizer,
    encode_words,
    extract_answer,
    find_value_copies,
    generate_problem,
    generate_problems,
    oracle_scorer,
)

# sha256 of the first 20 held-out problems as the original generator (before the families) wrote them.
DORMANT_EVAL_DIGEST = "c6bec516fe6ab9b2fb11b365945fc0d6ed013fc06685166ab27fe9fa487fa7e7"


def replay(prompt: str, completion: str) -> tuple[list[int], dict[int, list[int]], list[tuple[int, int]], dict[str, int]]:
    """An independent interpreter of a trace: checks every line against the machine's rules (every family) and
    returns the saves, the copies of each saved value (word indices), the reads of saved values (word index,
    save) and counts of re-reads and branches."""
    words = prompt.split()
    assert words[-1] == "<think>"
    state = {words[0]: int(words[1]), words[3]: int(words[4]), words[6]: int(words[7])}
    operation = {words[0]: words[2], words[3]: words[5], words[6]: words[8]}
    noise = int(words[9][1:])
    rest = words[10:-1]
    reuse_every, branches = None, False
    if rest[0].startswith("r"):
        reuse_every, rest = int(rest[0][1:]), rest[1:]
    elif rest[0] == "branch":
        branches, rest = True, rest[1:]
    schedule = {int(step[1:]): int(label[1:]) for label, step in zip(rest[0::2], rest[1::2])}
    registers = list(state)

    def apply(op: str, left: int, right: int) -> int:
        return (left + right) % 10 if op == "+" else (left - right) % 10

    def flip(op: str) -> str:
        return {"+": "-", "-": "+"}[op]

    trace = completion.split()
    think_end = trace.index(THINK_END)
    tokens, position, step, saves = trace[:think_end], 0, 0, []
    copies: dict[int, list[int]] = {}
    reads: list[tuple[int, int]] = []
    counts = {"rereads": 0, "branches": 0}
    pointer = None  # reuse: the save the next re-read restates

    def take(count: int) -> list[str]:
        nonlocal position
        chunk = tokens[position : position + count]
        position += count
        return chunk

    def state_words(of: dict[str, int]) -> list[str]:
        return [w for r in registers for w in (r, str(of[r]))]

    def take_copy(save: int, is_read: bool) -> None:
        """The next word is a copy of save ``save``'s value."""
        copies.setdefault(save, []).append(position)
        if is_read:
            reads.append((position, save))
        assert take(1) == [str(saves[save - 1])], f"copy of s{save}"

    def next_pointer() -> list[str]:
        """``next sK tN`` (the next save due, as the prompt's schedule gives it), then ``read sJ`` when re-reading."""
        due = min(s for s in schedule if s > step)
        line = ["next", f"s{schedule[due]}", f"t{due}"]
        return line + (["read", f"s{pointer}"] if pointer is not None else [])

    assert take(3) == next_pointer()
    while position < len(tokens):
        step += 1
        target, source = registers[(step - 1) % 3], registers[step % 3]
        left, right = state[target], state[source]
        result = apply(operation[target], left, right)
        state[target] = result
        expected = [f"t{step}", target, operation[target], source, ":", str(left), operation[target], str(right), "=", str(result), "|"]
        assert take(len(expected) + 6) == expected + state_words(state), f"step {step}"
        if result < noise:
            other = flip(operation[target])
            dead_end = ["wait", str(left), other, str(right), "=", str(apply(other, left, right)), "no", "check", *state_words(state), "ok"]
            assert take(len(dead_end)) == dead_end
        if branches and result >= 7:
            explored = dict(state)
            branch = ["try"]
            for offset in (1, 2):
                b_target, b_source = registers[(step + offset - 1) % 3], registers[(step + offset) % 3]
                op = flip(operation[b_target])
                b_left, b_right = explored[b_target], explored[b_source]
                explored[b_target] = apply(op, b_left, b_right)
                branch += [b_target, op, b_source, ":", str(b_left), op, str(b_right), "=", str(explored[b_target]), "|", *state_words(explored)]
            branch += ["drop", "back", *state_words(state)]
            assert take(len(branch)) == branch, f"branch after step {step}"
            counts["branches"] += 1
        reread = reuse_every is not None and saves and step % reuse_every == 0
        if reread:
            assert take(2) == ["read", f"s{pointer}"]
            take_copy(pointer, is_read=True)
            counts["rereads"] += 1
        if step in schedule:
            index = schedule[step]
            assert index == len(saves) + 1
            assert take(2) == ["save", str(result)]
            value = result
            if index >= 3:
                assert take(2) == ["+", f"s{index - 2}"]
                take_copy(index - 2, is_read=True)
                value = (result + saves[index - 3]) % 10
                assert take(2) == ["=", str(value)]
            assert take(2) == ["->", f"s{index}"]
            saves.append(value)
            take_copy(index, is_read=False)
        if reuse_every is not None and saves:
            # Round robin over the saves so far: the pointer starts at s1 and moves on after each re-read.
            pointer = 1 if pointer is None else (pointer % len(saves) + 1 if reread else pointer)
        if step < max(schedule):
            assert take(len(next_pointer())) == next_pointer(), f"step {step}"
    assert step == max(schedule), "the trace ends with the step of the last save"
    assert trace[think_end + 1 :] == [w for i, v in enumerate(saves, 1) for w in (f"s{i}", str(v))]
    reads += [(think_end + 2 * index, index) for index in range(1, len(saves) + 1)]
    return saves, copies, reads, counts


FAMILY_CONFIGS = [
    dict(family="dormant"),
    dict(family="reuse", reuse_every=2),
    dict(family="reuse", reuse_every=5),
    dict(family="reuse", reuse_every=10),
    dict(family="branches"),
]


@pytest.mark.parametrize("family", FAMILY_CONFIGS, ids=lambda f: f"{f['family']}{f.get('reuse_every', '')}")
@pytest.mark.parametrize("seed", range(4))
def test_traces_follow_the_machine_rules_and_the_annotation_lists_every_copy(seed: int, family: dict) -> None:
    rng = random.Random(seed)
    config = TaskConfig(steps=(rng.randint(8, 30), 60), saves=rng.randint(1, MAX_SAVES), noise=rng.randint(0, MAX_NOISE), **family)
    for problem in generate_problems(5, seed, config):
        saves, copies, reads, counts = replay(problem.prompt, problem.completion)
        assert problem.answer == " ".join(map(str, saves))
        assert extract_answer(problem.completion) == problem.answer
        assert problem.value_copies == copies
        assert sorted(problem.value_reads) == sorted(reads)
        assert problem.critical_positions == sorted(p for positions in copies.values() for p in positions)
        assert (problem.meta["rereads"], problem.meta["branches"]) == (counts["rereads"], counts["branches"])
        words = problem.completion.split()
        assert find_value_copies(words) == copies
        # Every read has a copy of its save written before it (the annotation's sufficiency rule holds).
        assert all(any(copy < position for copy in copies[save]) for position, save in reads)


def test_families_act_as_documented() -> None:
    reuse = generate_problems(30, 2, TaskConfig(family="reuse", reuse_every=2))
    dormant = generate_problems(30, 2, TaskConfig(family="dormant"))
    branches = generate_problems(30, 2, TaskConfig(family="branches"))
    # Frequent reuse: many re-reads, so the average gap between consecutive copies of a save is much shorter.
    def mean_gap(problems: list) -> float:
        gaps = [b - a for p in problems for positions in p.value_copies.values() for a, b in zip(positions, positions[1:])]
        return statistics.mean(gaps)

    assert min(p.meta["rereads"] for p in reuse) >= 8 and all(p.meta["rereads"] == 0 for p in dormant + branches)
    assert mean_gap(reuse) < 0.5 * mean_gap(dormant)
    rare = generate_problems(30, 2, TaskConfig(family="reuse", reuse_every=10))
    assert statistics.mean(p.meta["rereads"] for p in rare) < 0.3 * statistics.mean(p.meta["rereads"] for p in reuse)
    # Branches: about a third of the trace is abandoned exploration, none of it critical.
    for problem in branches:
        words = problem.completion.split()
        inside = [i for i, _ in enumerate(words[: problem.trace_length]) if _in_branch(words, i)]
        assert not set(inside) & set(problem.critical_positions)
    shares = [sum(_in_branch(p.completion.split(), i) for i in range(p.trace_length)) / p.trace_length for p in branches]
    assert 0.2 < statistics.mean(shares) < 0.45
    # At equal step ranges, the same seed draws the same machine and save schedule in every family.
    same = [generate_problems(10, 2, TaskConfig(steps=(30, 40), **family)) for family in FAMILY_CONFIGS]
    machines = [[(p.prompt.split()[:9], p.prompt.split()[-13:]) for p in problems] for problems in same]
    assert all(machine == machines[0] for machine in machines)


def _in_branch(words: list[str], index: int) -> bool:
    """Whether word ``index`` lies in a ``try ... drop`` span."""
    opened = max((i for i in range(index + 1) if words[i] == "try"), default=None)
    return opened is not None and "drop" not in words[opened:index]


def test_same_seed_same_problems_and_knobs_act() -> None:
    first = generate_problems(3, 7)
    assert [p.completion for p in first] == [p.completion for p in generate_problems(3, 7)]
    assert first[0].completion != generate_problems(3, 8)[0].completion
    short = generate_problems(20, 1, TaskConfig(steps=20, noise=0))
    long = generate_problems(20, 1, TaskConfig(steps=100, noise=0))
    assert max(p.trace_length for p in short) < min(p.trace_length for p in long)
    assert all("wait" not in p.completion for p in short)  # noise 0: no dead ends
    noisy = generate_problems(20, 1, TaskConfig(steps=20, noise=MAX_NOISE))
    assert sum(p.meta["dead_ends"] for p in noisy) > 0
    assert all(len(p.answer.split()) == 3 for p in generate_problems(5, 2, TaskConfig(saves=3)))


def test_critical_positions_are_the_saved_values() -> None:
    for problem in generate_problems(10, 3, TaskConfig(steps=(20, 40), saves=5)):
        words = problem.completion.split()
        assert len(problem.critical_positions) == 5 + 3  # every save value, plus restatements of saves 1..3
        for position in problem.critical_positions:
            assert words[position - 1].startswith("s") and words[position].isdigit()
        # Decision-critical tokens are a small minority of the trace.
        assert len(problem.critical_positions) < 0.05 * problem.trace_length


@pytest.mark.parametrize("family", FAMILY_CONFIGS, ids=lambda f: f"{f['family']}{f.get('reuse_every', '')}")
def test_default_traces_are_long_and_the_answer_needs_far_back_values(family: dict) -> None:
    problems = generate_problems(50, 0, TaskConfig(**family))
    mean = sum(p.trace_length for p in problems) / len(problems)
    assert 900 <= mean <= 1200
    # The first save is written hundreds of tokens before the answer reads it.
    distances = [p.trace_length - p.critical_positions[0] for p in problems]
    assert sorted(distances)[len(distances) // 2] > 300


def test_dormant_family_is_the_generator_the_bundled_reasoner_was_trained_on() -> None:
    # Pinned: the shipped model and the published tables use these held-out problems; a change to the dormant
    # family (draw order, format) must be deliberate and come with a retrained model.
    problems = generate_problems(20, EVAL_SEED)
    digest = hashlib.sha256("\n".join(p.prompt + " " + p.completion for p in problems).encode()).hexdigest()
    assert digest == DORMANT_EVAL_DIGEST
    assert TaskConfig() == TaskConfig(family="dormant", steps=FAMILY_STEPS["dormant"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps"),
        (dict(steps=(10, 5)), "steps"),
        (dict(steps=MAX_STEPS + 1), "steps"),
        (dict(saves=0), "saves"),
        (dict(saves=MAX_SAVES + 1), "saves"),
        (dict(steps=3, saves=4), "saves"),
        (dict(noise=MAX_NOISE + 1), "noise"),
        (dict(noise=-1), "noise"),
        (dict(family="loops"), "family must be one of"),
        (dict(family="reuse", reuse_every=3), r"reuse_every must be one of \(2, 5, 10\)"),
        (dict(family="dormant", reuse_every=2), "reuse_every applies only to family 'reuse'"),
        (dict(family="branches", reuse_every=5), "reuse_every applies only to family 'reuse'"),
    ],
)
def test_bad_knobs_name_the_parameter_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_family_defaults() -> None:
    assert TaskConfig(family="reuse").reuse_every == 2
    assert TaskConfig(family="branches").step_range == FAMILY_STEPS["branches"]
    assert TaskConfig(family="reuse", steps=12).step_range == (12, 12)


@pytest.mark.parametrize("family", FAMILY_CONFIGS, ids=lambda f: f"{f['family']}{f.get('reuse_every', '')}")
def test_oracle_marks_exactly_the_annotated_copies(family: dict) -> None:
    import torch

    score_fn = oracle_scorer().score_fn
    tokenizer = build_tokenizer()
    for problem in generate_problems(3, 4, TaskConfig(**family)):
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + encode_words(problem.completion)])
        hidden = torch.zeros(1, ids.shape[1], 4)
        # As a cache feeds it: the prompt in one pass, then one token per step (the scorer carries the last id).
        scores = [score_fn(hidden[:, : len(prompt_ids)], ids[:, : len(prompt_ids)])]
        scores += [score_fn(hidden[:, k : k + 1], ids[:, k : k + 1]) for k in range(len(prompt_ids), ids.shape[1])]
        marked = torch.cat(scores, dim=1)[0].nonzero().flatten().tolist()
        think_end = len(prompt_ids) + problem.trace_length
        assert [p for p in marked if p < think_end] == [len(prompt_ids) + p for p in problem.critical_positions]


@pytest.mark.parametrize("family", FAMILY_CONFIGS, ids=lambda f: f"{f['family']}{f.get('reuse_every', '')}")
def test_tokenizer_is_word_level_with_a_single_think_end_token(family: dict) -> None:
    tokenizer = build_tokenizer()
    problem = generate_problem(random.Random(0), TaskConfig(**family))
    text = f"{problem.prompt} {problem.completion}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == encode_words(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer.encode(THINK_END, add_special_tokens=False)) == 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.padding_side == "left"


def test_extract_answer_rejects_malformed_answers() -> None:
    assert extract_answer("t1 a + b </think> s1 4 s2 7") == "4 7"
    assert extract_answer("no answer") is None
    assert extract_answer("</think> s2 4") is None  # must start at s1
