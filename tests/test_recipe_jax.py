"""The training recipe under the JAX backend (a subprocess each: the backend is chosen at import).

Apart from tests/test_recipe.py so that the two test processes share the long training tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    """The environment of a JAX subprocess, with JAX's persistent compilation cache (README, "On a GPU")
    shared by this file's runs: a step compiled once is loaded, not compiled, by the runs after it."""
    pytest.importorskip("jax")
    cache = tmp_path_factory.mktemp("jax_compilation_cache")
    return dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache))


# ----- JAX -------------------------------------------------------------------------------------
JAX_TRAINING = """
import numpy as np, keras
assert keras.backend.backend() == "jax"
from Data.loaders import load_dataset
from Models.diffusion import checkpoints as ck
from Models.diffusion.optimizer import make_optimizer, ema_optimizer
from Models.diffusion.trainer import TrainBatches
from Data.registry import get_spec
from Utils.runtime import configure_runtime
# As Pipeline/adapt.py compiles: without --xla too, JAX must jit (op by op is many times slower).
jit = configure_runtime(seed=0, xla=False)
assert jit is True, jit
splits = load_dataset("digits")
model = ck.build_model("tiny", get_spec("digits"), seed=0, recipe={"ema_decay": 0.99, "cond_dropout": 0.1})
batches = TrainBatches(splits.x_train, splits.y_train, 64, model.image_size, seed=0)
model.compile(optimizer=make_optimizer(2e-3, 3 * len(batches), 0.99), jit_compile=jit)
history = model.fit(batches, epochs=3, verbose=0)
assert model.jit_compile is True
with ema_optimizer(model.optimizer).averaged_weights(model.trainable_variables):
    images = model.generate([0, 1], num_steps=3, seed=0, jit_compile=jit)
print("LOSSES", *history.history["loss"])
print("IMAGES", images.shape, images.dtype)
"""


def test_training_runs_under_jax_and_the_loss_falls(jax_env):
    result = subprocess.run([sys.executable, "-c", JAX_TRAINING], cwd=REPO, env=jax_env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(v) for v in result.stdout.split("LOSSES")[1].split("\n")[0].split()]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert "IMAGES (2, 8, 8, 3) uint8" in result.stdout
    # The train step and the sampling loop went into the cache that JAX_COMPILATION_CACHE_DIR names.
    assert len(list(Path(jax_env["JAX_COMPILATION_CACHE_DIR"]).iterdir())) >= 2


JAX_RESUME = """
import json, sys, keras
assert keras.backend.backend() == "jax"
from tests.test_recipe import largest_resume_differences, run_uninterrupted_and_killed
print("DIFFERENCES", json.dumps(largest_resume_differences(run_uninterrupted_and_killed(sys.argv[1]))))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_bit_for_bit_under_jax(tmp_path, jax_env):
    """XLA's CPU kernels are deterministic, so the resumed run must equal the uninterrupted one
    exactly: the averaged weights, the trained weights, Adam's moments and the step counter. The
    killed run and its resumption load the uninterrupted run's compiled train step from the
    persistent cache, so this also checks that a cached step trains exactly as a fresh one."""
    result = subprocess.run([sys.executable, "-c", JAX_RESUME, str(tmp_path)], cwd=REPO, env=jax_env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    differences = json.loads(result.stdout.split("DIFFERENCES")[1].strip().splitlines()[0])
    assert differences == {"epoch_002.weights.h5": 0.0, "epoch_002.optimizer.h5": 0.0}, differences
