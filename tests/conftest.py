"""Shared test settings.

Tiny models run fastest on one thread, and one thread per test process avoids the heavy
slow-downs of oversubscribed cores when other processes share the machine."""

import os
import sys

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared corpus (6 random-word documents, 300-token BPE); read-only for tests."""
    from mor.data import prepare

    d = tmp_path_factory.mktemp("corpus")
    src = d / "src"
    src.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
        (src / f"doc{i}.txt").write_text(" ".join(words[j] for j in idx))
    out = d / "prepared"
    prepare([str(src)], str(out), vocab_size=300, val_fraction=0.15)
    return str(out)
