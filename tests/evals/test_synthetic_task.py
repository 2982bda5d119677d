"""The synthetic reasoning task: a correct, deterministic generator whose traces need far-back values."""

from __future__ import annotations

import random

import pytest
from dynts.evals.synthetic_task import (
    MAX_NOISE,
    MAX_SAVES,
    MAX_STEPS,
    THINK_END,
    TaskConfig,
    build_tokenizer,
    encode_words,
    extract_answer,
    generate_problem,
    generate_problems,
)


def replay(prompt: str, completion: str) -> list[int]:
    """An independent interpreter of a trace: checks every line against the machine's rules, returns the saves."""
    words = prompt.split()
    assert words[-1] == "<think>"
    state = {words[0]: int(words[1]), words[3]: int(words[4]), words[6]: int(words[7])}
    operation = {words[0]: words[2], words[3]: words[5], words[6]: words[8]}
    noise = int(words[9][1:])
    schedule = {int(step[1:]): int(label[1:]) for label, step in zip(words[10:-1:2], words[11:-1:2])}
    registers = list(state)

    def apply(op: str, left: int, right: int) -> int:
        return (left + right) % 10 if op == "+" else (left - right) % 10

    trace = completion.split()
    think_end = trace.index(THINK_END)
    tokens, position, step, saves = trace[:think_end], 0, 0, []

    def take(count: int) -> list[str]:
        nonlocal position
        chunk = tokens[position : position + count]
        position += count
        return chunk

    def state_words() -> list[str]:
        return [w for r in registers for w in (r, str(state[r]))]

    def next_pointer() -> list[str]:
        """``next sK tN``: the next save due, as the prompt's schedule gives it."""
        due = min(s for s in schedule if s > step)
        return ["next", f"s{schedule[due]}", f"t{due}"]

    assert take(3) == next_pointer()
    while position < len(tokens):
        step += 1
        target, source = registers[(step - 1) % 3], registers[step % 3]
        left, right = state[target], state[source]
        result = apply(operation[target], left, right)
        state[target] = result
        expected = [f"t{step}", target, operation[target], source, ":", str(left), operation[target], str(right), "=", str(result), "|"]
        assert take(len(expected) + 6) == expected + state_words(), f"step {step}"
        if result < noise:
            other = "-" if operation[target] == "+" else "+"
            dead_end = ["wait", str(left), other, str(right), "=", str(apply(other, left, right)), "no", "check", *state_words(), "ok"]
            assert take(len(dead_end)) == dead_end
        if step in schedule:
            index = schedule[step]
            assert index == len(saves) + 1
            value = result
            line = ["save", str(result)]
            if index >= 3:
                value = (result + saves[index - 3]) % 10
                line += ["+", f"s{index - 2}", str(saves[index - 3]), "=", str(value)]
            line += ["->", f"s{index}", str(value)]
            assert take(len(line)) == line
            saves.append(value)
        if step < max(schedule):
            assert take(3) == next_pointer(), f"step {step}"
    assert step == max(schedule), "the trace ends with the step of the last save"
    assert trace[think_end + 1 :] == [w for i, v in enumerate(saves, 1) for w in (f"s{i}", str(v))]
    return saves


@pytest.mark.parametrize("seed", range(6))
def test_traces_follow_the_machine_rules(seed: int) -> None:
    rng = random.Random(seed)
    config = TaskConfig(steps=(rng.randint(8, 30), 60), saves=rng.randint(1, MAX_SAVES), noise=rng.randint(0, MAX_NOISE))
    for problem in generate_problems(5, seed, config):
        saves = replay(problem.prompt, problem.completion)
        assert problem.answer == " ".join(map(str, saves))
        assert extract_answer(problem.completion) == problem.answer


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


def test_default_traces_are_long_and_the_answer_needs_far_back_values() -> None:
    problems = generate_problems(50, 0)
    mean = sum(p.trace_length for p in problems) / len(problems)
    assert 900 <= mean <= 1200
    # The first save is written hundreds of tokens before the answer reads it.
    distances = [p.trace_length - p.critical_positions[0] for p in problems]
    assert sorted(distances)[len(distances) // 2] > 300


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
    ],
)
def test_bad_knobs_name_the_parameter_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_tokenizer_is_word_level_with_a_single_think_end_token() -> None:
    tokenizer = build_tokenizer()
    problem = generate_problem(random.Random(0))
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
