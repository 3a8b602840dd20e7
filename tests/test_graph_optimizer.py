"""SDDG_TF_GRAPH_OPTIMIZER: TensorFlow's graph optimiser on (the default) or off (scripts of the tiny pipeline tests).

The product keeps TensorFlow's default. The tests marked `scripts_without_graph_optimizer` run their
scripts with it off (tests/conftest.py), and the test process gets the default back after them.
"""

import os
import subprocess
import sys

import pytest

from Utils.runtime import GRAPH_OPTIMIZER_ENV, configure_runtime, use_graph_optimizer

SCRIPTS = ("reproduce.py", "SD_adapting.py", "generate_dataset.py", "classifier_training.py")


def optimiser_is_on():
    import tensorflow as tf

    return not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)


@pytest.mark.scripts_without_graph_optimizer
def test_a_marked_test_runs_its_scripts_with_the_optimiser_off():
    assert os.environ[GRAPH_OPTIMIZER_ENV] == "off"
    configure_runtime()  # what a stage run in this process does
    assert not optimiser_is_on()


def test_after_it_the_test_process_has_the_default_again():
    # Runs after the test above in the same process (one file per worker, in order).
    assert os.environ.get(GRAPH_OPTIMIZER_ENV) is None
    assert optimiser_is_on()


def test_configure_runtime_follows_the_environment(monkeypatch):
    try:
        monkeypatch.delenv(GRAPH_OPTIMIZER_ENV, raising=False)
        configure_runtime()
        assert optimiser_is_on()  # unset: TensorFlow's default, as users run
        monkeypatch.setenv(GRAPH_OPTIMIZER_ENV, "off")
        configure_runtime()
        assert not optimiser_is_on()
        monkeypatch.setenv(GRAPH_OPTIMIZER_ENV, "on")
        configure_runtime()
        assert optimiser_is_on()
    finally:
        use_graph_optimizer(True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_value_is_one_line_and_exit_2_before_anything_is_written(tmp_path, script):
    from tests.test_reproduce import REPO

    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), **{GRAPH_OPTIMIZER_ENV: "maybe"})
    done = subprocess.run([sys.executable, str(REPO / script), "--dataset", "digits"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {GRAPH_OPTIMIZER_ENV}='maybe': expected one of on, off"]
    assert not any(tmp_path.iterdir())
