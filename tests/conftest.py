"""Shared test fixtures: the repository on sys.path, the shared real data, script runner,
tiny diffusion checkpoints, a throw-away PostgreSQL server."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Utils.paths import SHARED_DIR  # noqa: E402
from Utils.runtime import GRAPH_OPTIMIZER_ENV, use_graph_optimizer  # noqa: E402

SHARED_DATA = SHARED_DIR / "data"


def run_in_fresh_process(function, *args):
    """`function(*args)` in a new Python process (spawned: no TensorFlow state shared), its result
    returned and its exceptions raised here. For the full-size models: their memory goes back to
    the system when that process ends instead of staying with the test worker (see
    `release_memory_after_each_file`). `function` must be a module-level function of a test file."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def require_shared_file(name):
    """Path of a file in ../shared/data; skips when absent, but fails under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} is missing (see ../shared/data/README.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(module):
    """Imports a development-requirements module; skips when absent, but fails under CI=true."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is missing (pip install -r requirements-dev.txt)")
        raise


def require_program(*names, install):
    """The path of the first of `names` on PATH; skips when none is, but fails under CI=true.

    install: how to get it, for the message (e.g. "apt-get install chromium; .ci/run does it")."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def generated_digits(tmp_path_factory):
    """A generated-images folder in the project's layout (Data/synthetic_writer.py) for digits.

    Stand-ins for a generator's output: real training digits with pixel noise, so that no
    image equals a real test image (the scripted raters tell them apart by their pixels).
    """
    import numpy as np

    from Data.balance import per_class_counts
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Data.synthetic_writer import SyntheticWriter

    folder = tmp_path_factory.mktemp("generated") / "digits_generated"
    spec, splits = get_spec("digits"), load_dataset("digits")
    counts = per_class_counts(60, spec.num_classes)
    writer = SyntheticWriter(folder, spec, counts, {"dataset": "digits", "source": "noisy training digits"})
    writer.begin({})
    rng = np.random.default_rng(0)
    images, labels, indices = [], [], []
    for c, count in enumerate(counts):
        for n, i in enumerate(np.flatnonzero(splits.y_train == c)[:count]):
            noisy = splits.x_train[i, ..., :1].astype(int) + rng.integers(-24, 25, (8, 8, 1))
            images.append(np.repeat(np.clip(noisy, 0, 255), 3, axis=-1).astype(np.uint8))
            labels.append(c)
            indices.append(n)
    writer.write(np.stack(images), labels, indices)
    writer.finish("all", len(images), {}, grid_per_class=0)
    return folder


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


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """An output root holding tiny class-encoder checkpoints of epochs 1 and 2 for digits.

    Random weights, written with Models.diffusion.checkpoints' own functions and
    settings.json (what SD_adapting.py writes): these tests are about the tuning
    machinery, not the generator's quality, and skip a minute of training.
    """
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Utils.io import atomic_write_json

    root = tmp_path_factory.mktemp("tuning")
    folder = root / "Checkpoints" / "DDPM" / "Exp_0" / "digits" / "MyEmbedding"
    spec = get_spec("digits")
    model = ck.build_model("tiny", spec, init_seed=0)
    atomic_write_json(folder / ck.SETTINGS_FILE, {**ck.model_identity("tiny", spec, True, 0), "stage": "enc",
                                                  "epochs": 2, "seed": 0})
    for epoch in (1, 2):
        ck.save_parts(ck.weights_path(folder, epoch), ck.enc_parts(model))
    return root


def _postgres_bin_dir():
    """Folder of Debian's initdb/pg_ctl (the newest installed server), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _unavailable(message):
    """Skips locally, fails under CI=true: CI must run every multi-worker test."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb + pg_ctl in a temporary folder).

    Yields a postgresql:// URL with trust authentication; the server is stopped and its
    folder deleted afterwards. PostgreSQL refuses to run as root, so under root the
    cluster belongs to Debian's `postgres` user (runuser).
    """
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="sddg-postgres-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            _unavailable("running as root and there is no 'postgres' user to own the test cluster")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data, log = folder / "data", folder / "server.log"

    def command(*args):
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)

    started = False
    try:
        steps = [
            (bin_dir / "initdb", "-D", data, "-U", "sddg", "--auth=trust", "-E", "UTF8", "--no-sync"),
            # -F: no fsync, -k: its Unix socket in the temporary folder, not /var/run/postgresql.
            (bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60",
             "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F", "start"),
        ]
        for step in steps:
            done = command(*step)
            if done.returncode != 0:
                server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                _unavailable(f"could not start the test PostgreSQL server: {' '.join(map(str, step[:1]))} "
                             f"exited {done.returncode}: {done.stderr.strip()[-2000:]} {server_log}")
        started = True
        yield f"postgresql://sddg@127.0.0.1:{port}/postgres"
    finally:
        if started:
            command(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


# The longest test files, longest first (pytest --durations=0): run them first so the two
# xdist workers (pytest.ini) end together instead of one finishing a long file alone.
LONGEST_FILES_FIRST = ("test_conditioning_pipeline.py", "test_lora.py", "test_sd_adapting.py",
                       "test_diffusers_convert.py", "test_recipe.py", "test_hyp_opt.py", "test_train_subset.py",
                       "test_recipe_jax.py", "test_reproduce.py", "test_benchmark_helpers.py",
                       "test_classifier_training.py",
                       "test_learns_digits.py", "test_sd1_full_size.py", "test_generate_dataset.py",
                       "test_conditioning.py", "test_keras_cv_parity.py", "test_multi_worker_storage.py",
                       "test_pinned_images.py", "test_model_split.py", "test_diffusers_parity.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


@pytest.fixture(autouse=True)
def scripts_without_graph_optimizer(request, monkeypatch):
    """For the tests marked `scripts_without_graph_optimizer`: the scripts they start run with TensorFlow's
    graph optimiser off (SDDG_TF_GRAPH_OPTIMIZER=off). Most of a tiny pipeline's time is the first call
    of freshly traced functions, which the optimiser makes dearer: those tests take ~0.84x the time
    (BENCHMARKS.md, "The whole test suite"). Only where the scripts are tiny models in their own
    processes: off in the test workers themselves, a full run ran out of memory. Anything this test
    runs in this process follows the variable too, so the default is put back after it."""
    if request.node.get_closest_marker("scripts_without_graph_optimizer") is None:
        yield
        return
    monkeypatch.setenv(GRAPH_OPTIMIZER_ENV, "off")
    yield
    if "keras" in sys.modules:
        use_graph_optimizer(True)


# Each xdist worker runs many test files in one process: after each file it drops what it can
# (Keras' global state, garbage, glibc's free pages). A process never hands back all of the peak
# of a file that built full-size models (measured: BENCHMARKS.md, "The whole test suite"), and two
# workers holding such peaks exhaust a 24 GiB machine: those tests use `run_in_fresh_process`.
@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_file(request):
    yield
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session(free_memory=True)  # it collects garbage itself
    else:
        import gc
        gc.collect()
    try:  # hand freed heap pages back to the system (glibc keeps them otherwise)
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    log = os.environ.get("SDDG_TEST_MEMORY_LOG")
    if log:  # diagnosis: each file's resident memory after it ends, per worker
        import psutil
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {request.node.path.name} "
                    f"rss_after={psutil.Process().memory_info().rss / 2**30:.2f}GiB\n")
