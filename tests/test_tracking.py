"""``SequenceTracker`` against a reference computed from each row's whole token stream: which columns a row keeps,
where its answer span opens (the end-of-thinking marker, possibly split across feeds), when it finishes. Fed in
random feed sizes, as a static decode feeds its token log (up to 64 columns at once) and HF feeds one."""

from __future__ import annotations

import random

import pytest

from dynts.policy import OPEN_END
from dynts.tracking import SequenceTracker, find_marker

EOS, PAD = 3, 0


def naive_find(ids: list[int], marker: list[int], start: int) -> int | None:
    return next((i for i in range(start, len(ids) - len(marker) + 1) if ids[i : i + len(marker)] == marker), None)


def test_find_marker_matches_the_definition() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        marker = [rng.randint(0, 3) for _ in range(rng.randint(1, 3))]
        start = rng.randint(0, 4)
        assert find_marker(ids, marker, start) == naive_find(ids, marker, start), (ids, marker, start)


def reference(prompt_len: int, streams: list[list[int]], marker: list[int]) -> tuple[list, list, list]:
    """Per row, from its whole generated stream: kept flags of the generated columns, the answer span's start
    column (None: still thinking), whether it finished."""
    kept, answer, finished = [], [], []
    for stream in streams:
        stop = stream.index(EOS) + 1 if EOS in stream else len(stream)
        kept.append([column < stop for column in range(len(stream))])
        found = naive_find(stream[:stop], marker, 0)
        answer.append(None if found is None else prompt_len + found)
        finished.append(EOS in stream)
    return kept, answer, finished


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_in_random_feed_sizes_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    rows, prompt_len, steps = rng.randint(1, 6), rng.randint(1, 5), rng.randint(30, 150)
    marker = [7, 8, 9][: rng.randint(1, 3)]
    streams = []
    for _ in range(rows):
        stream = [rng.choice([1, 2, 4, 5, 7, 8, 9]) for _ in range(steps)]
        if rng.random() < 0.6:  # most rows finish
            stream[rng.randrange(steps)] = EOS
        if EOS in stream:
            stop = stream.index(EOS) + 1
            stream[stop:] = [PAD] * (steps - stop)
        streams.append(stream)
    tracker = SequenceTracker(rows, think_end=marker, protect_prompt=True, protect_answer=True)
    tracker.start_call(prompt_len, [EOS], PAD)
    tracker.feed(prompt_len, [[5] * prompt_len for _ in range(rows)], None)
    kept = [[] for _ in range(rows)]
    fed = 0
    while fed < steps:
        size = min(steps - fed, rng.choice([1, 1, 2, 3, 7, 64]))
        plan = tracker.feed(size, [stream[fed : fed + size] for stream in streams], None)
        for row, flags in enumerate(plan.stored):
            kept[row].extend(flags)
        fed += size
    want_kept, want_answer, want_finished = reference(prompt_len, streams, marker)
    assert kept == want_kept
    assert tracker.finished == want_finished
    for row in range(rows):
        spans = tracker.protected_spans[row]
        assert spans[0] == (0, prompt_len)
        answer = spans[1] if len(spans) > 1 else None
        assert answer == (None if want_answer[row] is None else (want_answer[row], OPEN_END)), (row, streams[row])
        stop = want_kept[row].count(True)
        assert tracker.unkept[row] == ([(prompt_len + stop, prompt_len + steps)] if stop < steps else [])
