"""Shared test fixtures: the repository on sys.path, the shared real data, script runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Utils.paths import SHARED_DIR  # noqa: E402

SHARED_DATA = SHARED_DIR / "data"


def require_shared_file(name):
    """Path of a file in ../shared/data; skips when absent, but fails under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} is missing (see ../shared/data/README.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def retinamnist_dir():
    """A --data_dir holding the real RetinaMNIST npz (read in place, never copied)."""
    return require_shared_file("retinamnist.npz").parent


@pytest.fixture
def run_script(tmp_path):
    """Runs one of the repository's scripts in a subprocess, outputs under tmp_path.

    Returns the CompletedProcess (text mode); `check` is left to the test.
    """

    def run(script, *args, timeout=900, env=None, cwd=None):
        full_env = dict(os.environ, SDDG_OUTPUT_ROOT=str(cwd or tmp_path), PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, str(REPO / script), *map(str, args)],
            cwd=cwd or tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout,
        )

    return run


# The longest test files, longest first (pytest --durations, session 2): run them first so the
# two xdist workers (pytest.ini) end together instead of one finishing a long file alone.
LONGEST_FILES_FIRST = ("test_reproduce.py", "test_hyp_opt.py", "test_keras_cv_parity.py",
                       "test_sd_adapting.py", "test_classifier_training.py", "test_learns_digits.py",
                       "test_sd1_full_size.py", "test_generate_dataset.py", "test_diffusers_parity.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
