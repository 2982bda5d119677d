import pytest

from dynts import CompressionConfig, resolve_think_end


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


def test_kept_older_floors_without_float_error():
    config = CompressionConfig(budget=16, window=4, keep_ratio=0.3)
    assert config.kept_older(10) == 3
    assert config.kept_older(0) == 0
    assert CompressionConfig(budget=16, window=4, keep_ratio=1.0).kept_older(7) == 7
    assert config.compacted_length(16) == 4 + 3
    assert config.compacted_length(16, protected_older=9) == 4 + 9


def test_next_trigger_waits_for_the_usual_gap_after_an_overflow():
    config = CompressionConfig(budget=16, window=4, keep_ratio=0.25)  # compacted length 4 + 3 = 7: gap 9
    assert config.next_trigger(7) == 16
    assert config.next_trigger(12) == 21


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
