"""SDDG_TF_GRAPH_OPTIMIZER: TensorFlow's graph optimiser on (the product's default) or off (the test suite's).

The suite turns it off for speed (tests/conftest.py); the tests marked `tf_graph_optimizer` run
with the product's default, here and in the scripts they start.
"""

import os
import subprocess
import sys

import pytest

from Utils.runtime import GRAPH_OPTIMIZER_ENV, configure_runtime

REPO_SCRIPTS = ("reproduce.py", "SD_adapting.py", "generate_dataset.py", "classifier_training.py")


def optimiser_is_on():
    import tensorflow as tf

    return not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)


def test_the_suite_runs_with_the_optimiser_off_unless_asked():
    expected = os.environ.get(GRAPH_OPTIMIZER_ENV) == "on"
    assert optimiser_is_on() is expected


@pytest.mark.tf_graph_optimizer
def test_a_marked_test_and_its_scripts_get_the_products_default():
    assert os.environ[GRAPH_OPTIMIZER_ENV] == "on" and optimiser_is_on()


def test_configure_runtime_follows_the_environment(monkeypatch):
    suite_setting = optimiser_is_on()
    try:
        monkeypatch.delenv(GRAPH_OPTIMIZER_ENV)
        configure_runtime()
        assert optimiser_is_on()  # unset: TensorFlow's default, as users run
        monkeypatch.setenv(GRAPH_OPTIMIZER_ENV, "off")
        configure_runtime()
        assert not optimiser_is_on()
        monkeypatch.setenv(GRAPH_OPTIMIZER_ENV, "on")
        configure_runtime()
        assert optimiser_is_on()
    finally:
        from Utils.runtime import use_graph_optimizer

        use_graph_optimizer(suite_setting)


@pytest.mark.parametrize("script", REPO_SCRIPTS)
def test_a_bad_value_is_one_line_and_exit_2_before_anything_is_written(tmp_path, script):
    from tests.test_reproduce import REPO

    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), **{GRAPH_OPTIMIZER_ENV: "maybe"})
    done = subprocess.run([sys.executable, str(REPO / script), "--dataset", "digits"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {GRAPH_OPTIMIZER_ENV}='maybe': expected one of on, off"]
    assert not any(tmp_path.iterdir())
