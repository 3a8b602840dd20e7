"""SDDG_TF_MALLOC_PATCH: TensorFlow's 128 KB mmap threshold undone by the training datasets (the default) or kept.

TensorFlow's first generator dataset in a process sets glibc's mmap threshold to 128 KB, and Keras
feeds every `PyDataset` to `fit` through one; from then on every buffer over 128 KB is memory-mapped
afresh. `Utils.runtime.keep_tensor_buffers_on_heap` raises it again. Each case runs in a fresh
process, since the threshold is process-wide and TensorFlow sets it once per process.

The probe: 1 MB blocks from malloc, 64 more than the heap's free memory could hold, all live at once,
and how many of them glibc memory-mapped (`mallinfo2().hblks`): at least 64 under a 128 KB threshold,
none under 32 MB.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from Utils.runtime import TF_MALLOC_PATCH_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    sys.path.insert(0, os.getcwd())

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mapped_blocks(size=1 << 20):
        # More than the heap's free chunks can serve: only new memory is mapped or not.
        count = 64 + libc.mallinfo2().fordblks // size
        before = libc.mallinfo2().hblks
        blocks = [libc.malloc(size) for _ in range(count)]
        mapped = libc.mallinfo2().hblks - before
        for block in blocks:
            libc.free(block)
        return mapped
""")

CLASSIFIER_FIT = PROBE + textwrap.dedent("""
    import keras
    import numpy as np
    from Models.classifier import EpochShuffledBatches

    rng = np.random.default_rng(0)
    x = rng.random((64, 4), dtype="float32")
    y = keras.utils.to_categorical(rng.integers(0, 2, 64), 2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(EpochShuffledBatches(x, y, batch_size=16, seed=0), epochs=1, shuffle=False, verbose=0)
    print(mapped_blocks())
""")

DIFFUSION_FIT = PROBE + textwrap.dedent("""
    import keras
    import numpy as np
    from Models.diffusion.optimizer import make_optimizer
    from Models.diffusion.trainer import DiffusionTrainer, TrainBatches

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 8, 8, 1), dtype="uint8"), rng.integers(0, 10, 8)
    keras.utils.set_random_seed(0)
    trainer = DiffusionTrainer.from_preset("tiny", num_classes=10, image_size=8, stage="enc", image_channels=1)
    trainer.compile(optimizer=make_optimizer(1e-3, total_steps=1, ema_decay=None))
    trainer.fit(TrainBatches(images, labels, batch_size=8, image_size=8), epochs=1, shuffle=False, verbose=0)
    print(mapped_blocks())
""")

TENSORFLOW_ALONE = PROBE + textwrap.dedent("""
    import tensorflow as tf

    list(tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec((), tf.int32)))
    print(mapped_blocks())
""")


def mapped_blocks_after(script, choice=None):
    from tests.test_reproduce import REPO

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop(TF_MALLOC_PATCH_ENV, None)
    if choice is not None:
        env[TF_MALLOC_PATCH_ENV] = choice
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


needs_tensorflows_patch = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="TensorFlow sets the threshold under Python 3.11 (its patch's name)")


@needs_tensorflows_patch
def test_tensorflows_generator_dataset_memory_maps_every_block_over_128_kb():
    # What the workaround is for: after one generator dataset, 1 MB blocks are mapped one by one.
    assert mapped_blocks_after(TENSORFLOW_ALONE) >= 60


@needs_tensorflows_patch
def test_kept_when_asked_the_classifiers_fit_leaves_it():
    assert mapped_blocks_after(CLASSIFIER_FIT, "keep") >= 60


def test_after_a_classifiers_fit_large_blocks_come_from_the_heap():
    assert mapped_blocks_after(CLASSIFIER_FIT) == 0


def test_after_a_diffusion_models_fit_large_blocks_come_from_the_heap():
    assert mapped_blocks_after(DIFFUSION_FIT) == 0


def test_a_bad_value_is_one_line_and_exit_2_before_anything_is_written(tmp_path):
    from tests.test_reproduce import REPO

    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), **{TF_MALLOC_PATCH_ENV: "maybe"})
    done = subprocess.run([sys.executable, str(REPO / "classifier_training.py"), "--dataset", "digits"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {TF_MALLOC_PATCH_ENV}='maybe': expected one of undo, keep"]
    assert list(tmp_path.iterdir()) == []
