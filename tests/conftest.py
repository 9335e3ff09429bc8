"""Shared fixtures: checkpoints written by transformers, built once per test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the working directory first on sys.path.  Run from the repository root, the kernels/
# directory there (installed as vitnp.kernels) would then be imported as `kernels`, shadowing Hugging Face's
# `kernels` distribution, which transformers imports when it is installed.  vitnp itself is imported through its
# installation, never from the working directory.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPOSITORY]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def private_autotune_cache(tmp_path_factory):
    """Tests time the "auto" backend afresh instead of reading the user's stored decisions."""
    import os

    os.environ["VITNP_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitnp-cache"))
from checkpoints import make_checkpoint  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-vit"), "vit", "tiny", num_labels=10)


@pytest.fixture(scope="session")
def tiny_deit(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-deit"), "deit", "tiny", num_labels=7)


@pytest.fixture(scope="session")
def tiny_deit_distilled(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-deit-distilled"), "deit-distilled", "tiny", num_labels=6)


@pytest.fixture(scope="session")
def base_vit(tmp_path_factory) -> Path:
    """Full google/vit-base-patch16-224 shape (1000 labels)."""
    return make_checkpoint(tmp_path_factory.mktemp("vit-base"), "vit", "base", num_labels=1000)


@pytest.fixture(scope="session")
def base_deit_distilled(tmp_path_factory) -> Path:
    """Full facebook/deit-base-distilled-patch16-224 shape (1000 labels)."""
    return make_checkpoint(tmp_path_factory.mktemp("deit-base"), "deit-distilled", "base", num_labels=1000)


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=100,
                     help="examples per fuzz test (tests/test_fuzz_checkpoint.py); more for a longer run")
