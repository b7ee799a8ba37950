"""Shared test fixtures: the repository root on sys.path, numbered stages importable by name, the
tiny model saved once (TINY: its directory), and no hub lookups (HF_HUB_OFFLINE)."""

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id is looked up in the local cache only: no retries

from tiny import tiny_dir  # noqa: E402

TINY = tiny_dir()


def stage(name: str):
    """Import a numbered stage script, e.g. stage('01_catalog')."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama and its tokenizer, loaded as the stages load models."""
    import common
    return common.load_model(TINY)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo world (60 conversations, N=5) written to a temporary data directory."""
    out = tmp_path_factory.mktemp("demo") / "data"
    stage("01_catalog").main(["--data-dir", str(out), "--conversations", "60", "--n-items", "5"])
    return out


# The models in tests are tiny: one thread is faster than two (no thread hand-off per op), and a
# busy 2-core machine does not thrash.
import torch  # noqa: E402

torch.set_num_threads(1)
