"""The full-size sd1 model (UNet + autoencoder, random weights) trains a step and generates on a CPU.

Random weights (`random_init`): keras-cv's files cannot be downloaded here. At
128 px, as the paper: one class-encoder training step (the UNet and the
autoencoder frozen), then a 2-step guided DDIM generation decoded to pixels.
The peak memory (RSS) is printed for BENCHMARKS.md. It runs in a process of its own
(`run_in_fresh_process`), so its peak is its own and its memory is returned when it ends.
"""

import resource

import numpy as np
import pytest

from Data.loaders import load_dataset
from Data.registry import get_spec
from Models.diffusion import checkpoints as ck
from Models.diffusion.optimizer import make_optimizer
from Models.diffusion.trainer import TrainBatches
from conftest import run_in_fresh_process


@pytest.mark.slow
def test_sd1_class_encoder_step_and_generation_at_128px():
    run_in_fresh_process(sd1_class_encoder_step_and_generation)


def sd1_class_encoder_step_and_generation():
    spec = get_spec("digits")
    splits = load_dataset("digits")
    model = ck.build_model("sd1", spec, stage="enc", random_init=True, init_seed=0)
    assert model.image_size == 128 and model.latent_size == 16
    assert model.unet.count_params() > 800_000_000  # the real UNet, not a small stand-in
    trainable = {id(v) for v in model.trainable_variables}
    assert trainable == {id(v) for v in model.class_encoder.trainable_variables}

    unet_probe = model.unet.weights[0].numpy().copy()
    encoder_before = model.class_encoder.dense2.kernel.numpy()[:4].copy()
    batches = TrainBatches(splits.x_train[:2], splits.y_train[:2], batch_size=2, image_size=128)
    model.compile(optimizer=make_optimizer(1e-4, 1))
    history = model.fit(batches, epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and loss > 0
    assert not np.array_equal(model.class_encoder.dense2.kernel.numpy()[:4], encoder_before)
    np.testing.assert_array_equal(model.unet.weights[0].numpy(), unet_probe)

    images = model.generate([0, 1], num_steps=2, guidance_scale=7.5, seed=0, batch_size=2)
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8
    assert images.std() > 0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\nsd1 at 128 px, batch 2: loss {loss:.4f}, peak RSS {peak_gib:.1f} GiB")
    assert peak_gib < 20
