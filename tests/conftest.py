"""Shared test settings and the one random corpus.

Tiny models run fastest on one thread, and one thread per test process avoids the heavy
slow-downs of oversubscribed cores when other processes share the machine. Builders shared
by several test modules live in tests/helpers.py."""

import os
import sys

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, tests/reference.py


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small random text corpus: 6 documents of 3000 random words (raw .txt files); read-only."""
    from helpers import CORPUS_WORDS, random_words

    d = tmp_path_factory.mktemp("corpus") / "src"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        (d / f"doc{i}.txt").write_text(random_words(3000, g, CORPUS_WORDS))
    return d


@pytest.fixture(scope="session")
def data_dir(corpus_dir):
    """The corpus prepared (300-token BPE, 15% held out); read-only for tests."""
    from mor.data import prepare

    out = corpus_dir.parent / "prepared"
    prepare([str(corpus_dir)], str(out), vocab_size=300, val_fraction=0.15)
    return str(out)
