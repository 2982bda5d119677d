"""A tiny Llama over the synthetic task's word vocabulary, saved with its tokenizer (for the CLI tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynts.evals.synthetic_task import build_tokenizer
from predictor_support import synthetic_vocab_model


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-reasoner")
    model = synthetic_vocab_model()
    # A random model may end a trace at any point; the CLI tests need traces of the length they ask for.
    model.generation_config.suppress_tokens = [model.config.eos_token_id]
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
