import pytest

from dynts import CompressionConfig, resolve_think_end
from dynts.policy import compacted_length, keep_quota, next_trigger


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=8, window=8), r"budget must be > window \(= 8\), got budget=8"),
        (dict(budget=4, window=8), r"budget must be > window"),
        (dict(budget=16, window=-1), r"window must be >= 0, got -1"),
        (dict(budget=-5, window=0), r"budget must be > window"),
        (dict(budget=16, window=4, keep_ratio=0.0), r"keep_ratio must be in \(0, 1\], got 0.0"),
        (dict(budget=16, window=4, keep_ratio=1.5), r"keep_ratio must be in \(0, 1\], got 1.5"),
        (dict(budget=16, window=4, keep_ratio=float("nan")), r"keep_ratio must be in \(0, 1\]"),
        (dict(budget=16, window=4, granularity="per_head"), r"granularity must be one of"),
        (dict(budget=16, window=4, think_end=()), r"think_end must be a non-empty"),
        (dict(budget=16, window=4, think_end=(3, -1)), r"think_end must hold non-negative int token ids"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_types_are_checked():
    with pytest.raises(TypeError, match="budget must be an int"):
        CompressionConfig(budget=16.0, window=4)
    with pytest.raises(TypeError, match="protect_prompt must be a bool"):
        CompressionConfig(budget=16, window=4, protect_prompt="yes")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown CompressionConfig field\(s\) \['bugdet'\]"):
        CompressionConfig.from_dict({"bugdet": 10, "window": 2})
    config = CompressionConfig.from_dict({"budget": 10, "window": 2, "think_end": [7, 8]})
    assert config.think_end == (7, 8)


def test_keep_quota_floors_without_float_error():
    config = CompressionConfig(budget=16, window=4, keep_ratio=0.3)
    assert keep_quota(config, 10) == 3
    assert keep_quota(config, 0) == 0
    assert keep_quota(CompressionConfig(budget=16, window=4, keep_ratio=1.0), 7) == 7
    assert compacted_length(config, 16) == 4 + 3
    assert compacted_length(config, 16, protected_older=9) == 4 + 9


def test_next_trigger_waits_for_the_usual_gap_after_an_overflow():
    config = CompressionConfig(budget=16, window=4, keep_ratio=0.25)  # compacted length 4 + 3 = 7: gap 9
    assert next_trigger(config, 7, overflow=False) == 16
    assert next_trigger(config, 12, overflow=True) == 21
    # Without overflow the budget triggers, even after a compaction that kept more (a prompt longer than the budget).
    assert next_trigger(config, 12, overflow=False) == 16


def test_fixed_budget_mode_compacts_from_budget_plus_buffer_down_to_budget():
    config = CompressionConfig(budget=16, window=4, budget_mode="fixed", buffer=8)
    assert config.trigger == 24
    assert compacted_length(config, 24) == 16 and keep_quota(config, 20) == 12
    assert compacted_length(config, 24, protected_older=15) == 4 + 15  # protected overflow keeps them all
    assert next_trigger(config, 16, overflow=False) == 24
    assert next_trigger(config, 19, overflow=True) == 19 + 8
    assert CompressionConfig(budget=16, window=4, budget_mode="fixed").buffer == 128  # R-KV's interval
    with pytest.raises(ValueError, match="buffer is used by budget_mode='fixed' only"):
        CompressionConfig(budget=16, window=4, buffer=8)
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        CompressionConfig(budget=16, window=4, budget_mode="rkv")


def test_vocab_check():
    config = CompressionConfig(budget=16, window=4, think_end=(9, 10))
    config.validate_vocab(11)
    with pytest.raises(ValueError, match=r"think_end token id 10 is not in the vocabulary \(allowed range 0..9\)"):
        config.validate_vocab(10)


class _Tokenizer:
    """Just enough of a tokenizer: '</think>' is either one known token or three pieces."""

    def __init__(self, single: bool):
        self.single, self.unk_token_id = single, 0

    def convert_tokens_to_ids(self, text):
        return 42 if self.single and text == "</think>" else 0

    def encode(self, text, add_special_tokens=False):
        return [5, 6, 7]

    def decode(self, ids):
        return "</think>" if list(ids) == [5, 6, 7] else "?"


def test_resolve_think_end():
    assert resolve_think_end(_Tokenizer(single=True)) == (42,)
    assert resolve_think_end(_Tokenizer(single=False)) == (5, 6, 7)
    with pytest.raises(ValueError, match="does not round-trip"):
        resolve_think_end(_Tokenizer(single=False), "</reasoning>")
