"""Fixtures for the model tests (helpers live in tiny_lm.py, importable by name)."""

import pytest

from tiny_lm import build_char_tokenizer


@pytest.fixture
def char_tokenizer():
    return build_char_tokenizer()
