"""Process-wide set-up for the scripts: seeds, GPU memory growth, precision, XLA, devices.

Example:
    >>> configure_runtime(seed=0, mixed_precision="bfloat16", xla=True)
    >>> with distribution_scope(multi_gpu=True):
    ...     model = build_model()
"""

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass

from Utils.errors import InputError
from Utils.settings import RUNTIME, Settings, setting

# Quieter TensorFlow start-up; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Keras (and with it TensorFlow, seconds to start and chatty on stderr) is imported
# inside the functions, so scripts can add these flags and reject bad arguments first.

PRECISIONS = ("float32", "float16", "bfloat16")

# TensorFlow's graph optimiser (Grappler) rewrites every traced function before its first run:
# seconds per train step, sampling loop and classifier, which a short run (a test, a smoke run)
# pays many times over and a long run once. "off" makes the first call of each ~1.4x cheaper and
# changes the trained weights in the last bits (BENCHMARKS.md, "The whole test suite"); the product
# keeps TensorFlow's default, "on". The tiny pipeline tests set "off" for their scripts (tests/conftest.py).
GRAPH_OPTIMIZER_ENV = "SDDG_TF_GRAPH_OPTIMIZER"
GRAPH_OPTIMIZER_CHOICES = ("on", "off")

# TensorFlow's memory patch for generator datasets: "undo" it (the default) or "keep" it.
# See `keep_tensor_buffers_on_heap`.
TF_MALLOC_PATCH_ENV = "SDDG_TF_MALLOC_PATCH"
TF_MALLOC_PATCH_CHOICES = ("undo", "keep")
# glibc's mallopt(3) parameter number for M_MMAP_THRESHOLD, and the ceiling glibc's own adaptive
# threshold rises to on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_M_MMAP_THRESHOLD = -3
HEAP_BLOCK_LIMIT_BYTES = 32 * 1024 * 1024
_tf_malloc_patch_undone = False


def set_seed(seed):
    """Seeds Python, NumPy and the backend: same seed, same numbers."""
    import keras

    keras.utils.set_random_seed(int(seed))


def fresh_layer_names():
    """Name the layers built next as a fresh process would ("dense", "dense_1", ...).

    Keras numbers automatic layer names across the whole process, the names go into the graph
    TensorFlow builds from a train step, and its graph optimiser (Grappler) rewrites that graph
    differently with other names: the same model, seed and data trained after another model in
    the same process end in weights that differ in the last bits, which many epochs grow into other
    images (with Grappler off, or in a fresh process, they agree bit for bit). So a whole model is
    built after this: a resumed pipeline, a second run in a notebook, or a benchmark that scored
    a classifier first train what a fresh process trains. Only the counters are reset, not Keras'
    other global state (`keras.backend.clear_session` would also drop the dtype policy and the seed);
    models already built keep their names.
    """
    from keras.src.utils import naming

    naming.reset_uids()


def graph_optimizer_setting():
    """Whether `$SDDG_TF_GRAPH_OPTIMIZER` asks for TensorFlow's graph optimiser ("on", the default)."""
    value = os.environ.get(GRAPH_OPTIMIZER_ENV, "on")
    if value not in GRAPH_OPTIMIZER_CHOICES:
        raise InputError(f"{GRAPH_OPTIMIZER_ENV}={value!r}: expected one of {', '.join(GRAPH_OPTIMIZER_CHOICES)}")
    return value == "on"


def use_graph_optimizer(on):
    """TensorFlow's graph optimiser on or off for the functions traced from now on (no-op elsewhere)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not on})


def tf_malloc_patch_setting():
    """Whether `$SDDG_TF_MALLOC_PATCH` asks to undo TensorFlow's mmap threshold ("undo", the default)."""
    value = os.environ.get(TF_MALLOC_PATCH_ENV, "undo")
    if value not in TF_MALLOC_PATCH_CHOICES:
        raise InputError(f"{TF_MALLOC_PATCH_ENV}={value!r}: expected one of {', '.join(TF_MALLOC_PATCH_CHOICES)}")
    return value == "undo"


def keep_tensor_buffers_on_heap():
    """Undo TensorFlow's 128 KB mmap threshold for this process; a no-op unless TensorFlow runs on glibc.

    The first generator dataset that runs in a process sets glibc's mmap threshold to 128 KB
    (TensorFlow's `ApplyPython311MemoryPatch`, against the memory growth of generator datasets under
    Python 3.11), and Keras feeds every `PyDataset` to `fit` through one. From then on every buffer
    over 128 KB, nearly every activation and gradient of a train step, is memory mapped afresh and
    page-faulted in on each step: `small` at 8 px has ~6,000 more page faults per step, and a steady
    step 1.04-1.7x as long (BENCHMARKS.md, "TensorFlow's mmap threshold"). So this runs such a dataset once,
    which makes TensorFlow apply its setting now (it does so once per process), and then raises the
    threshold to 32 MB, the ceiling of glibc's own adaptive threshold: freed buffers are reused.
    `$SDDG_TF_MALLOC_PATCH=keep` leaves TensorFlow's setting. Called by the training datasets.
    """
    global _tf_malloc_patch_undone
    if _tf_malloc_patch_undone:
        return
    import keras

    if not tf_malloc_patch_setting() or keras.backend.backend() != "tensorflow" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    import tensorflow as tf

    if not tf.executing_eagerly():
        return
    list(tf.data.Dataset.from_generator(lambda: iter(()), output_signature=tf.TensorSpec((), tf.int32)))
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT_BYTES)
    _tf_malloc_patch_undone = True


def configure_runtime(seed=None, mixed_precision="float32", xla=False):
    """Memory growth on every GPU, the dtype policy, the graph optimiser, and the seed.

    mixed_precision: 'float32', 'float16' or 'bfloat16' (mixed_float16 /
    mixed_bfloat16 policies: variables stay float32). Returns whether to compile
    with XLA, for `model.compile(jit_compile=...)` and the samplers: when asked for,
    and always on JAX, which has no graph mode short of XLA (un-jitted, Keras' JAX
    train step runs op by op, many times slower).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # devices already initialised
                pass
    use_graph_optimizer(graph_optimizer_setting())
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}")
    keras.mixed_precision.set_dtype_policy(
        "float32" if mixed_precision == "float32" else f"mixed_{mixed_precision}"
    )
    if seed is not None:
        set_seed(seed)
    return bool(xla) or keras.backend.backend() == "jax"


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings(Settings):
    """The GPU flags every training or sampling stage shares; stage settings inherit them."""

    mixed_precision: str = setting("float32", choices=PRECISIONS, group=RUNTIME,
                                   help="compute dtype; variables stay float32")
    xla: bool = setting(False, group=RUNTIME, help="compile training and sampling with XLA")
    multi_gpu: bool = setting(False, group=RUNTIME,
                              help="data-parallel over all local GPUs (MirroredStrategy on TensorFlow, "
                                   "keras.distribution.DataParallel on JAX)")

    def runtime(self):
        """Just the GPU flags, to pass on to another stage's settings (`**s.runtime().as_dict()`)."""
        return RuntimeSettings(mixed_precision=self.mixed_precision, xla=self.xla, multi_gpu=self.multi_gpu)


@contextlib.contextmanager
def distribution_scope(multi_gpu=False):
    """Builds and trains models data-parallel over all local GPUs when asked."""
    if not multi_gpu:
        yield
        return
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy().scope():
            yield
    elif backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        yield
    else:
        raise ValueError(f"--multi_gpu is not supported on the {backend} backend")


def software_versions():
    """{package: version} of what ran, plus Python, platform and the git commit."""
    from importlib import metadata

    from Utils.paths import REPO_ROOT

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "tensorflow-cpu", "keras", "keras-cv", "optuna", "numpy", "scipy",
                    "scikit-learn", "pillow", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        import keras

        out["keras backend"] = keras.backend.backend()
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out["cpu cores"] = str(os.cpu_count())
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        out["GPUs"] = ", ".join(g.name for g in gpus) if gpus else "none"
    except ImportError:
        pass
    return out
