"""A tiny Llama over the synthetic task's word vocabulary, saved with its tokenizer (for the CLI tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynts.evals.synthetic_task import build_tokenizer
from predictor_support import synthetic_vocab_model


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-reasoner")
    synthetic_vocab_model().save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
