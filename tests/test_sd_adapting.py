"""SD_adapting.py and DiffusionTrainer's training: what trains, checkpoints, resume, errors."""

import csv
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import SD_adapting  # noqa: E402
from Data.registry import get_spec  # noqa: E402
from Models.diffusion import checkpoints as ck  # noqa: E402
from Models.diffusion.optimizer import make_optimizer  # noqa: E402
from Models.diffusion.presets import get_preset  # noqa: E402
from Models.diffusion.trainer import DiffusionTrainer  # noqa: E402
from Models.errors import CheckpointError  # noqa: E402
from Utils.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENC = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--epochs", "3", "--freq", "1",
       "--batch_size", "128", "--grid_per_class", "1", "--verbose", "0"]


def error_lines(stderr):
    """stderr without TensorFlow's own start-up log lines (absl / C++ logging)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith("WARNING: All log messages")
            and not re.match(r"^[IWEF]\d{4} ", line)]


def csv_epochs(path):
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


# ----- the model: what each stage trains -------------------------------------------------------
def _one_eager_step(model, data):
    model.compile(optimizer=make_optimizer(1e-2, 10), run_eagerly=True)
    model.fit((data[0], data[1]), batch_size=len(data[0]), epochs=1, verbose=0)


@pytest.fixture(scope="module")
def digits_batch():
    from Data.loaders import load_dataset

    splits = load_dataset("digits")
    return splits.x_train[:16], splits.y_train[:16]


@pytest.mark.parametrize("stage", ["enc", "dif"])
def test_each_stage_trains_only_its_part(stage, digits_batch):
    # A "pretrained" tiny preset behaves as sd1/sd2 do: its enc stage leaves the UNet alone.
    pretrained = dataclasses.replace(get_preset("tiny"), pretrained=True)
    keras.utils.set_random_seed(0)
    model = DiffusionTrainer.from_preset(pretrained, num_classes=10, image_size=8, stage=stage)
    before = {name: [w.numpy().copy() for w in part.weights]
              for name, part in (("unet", model.unet), ("class_encoder", model.class_encoder))}
    _one_eager_step(model, digits_batch)
    trained = {"enc": "class_encoder", "dif": "unet"}[stage]
    for name, part in (("unet", model.unet), ("class_encoder", model.class_encoder)):
        changed = any(not np.array_equal(a, w.numpy()) for a, w in zip(before[name], part.weights))
        assert changed is (name == trained), (stage, name)
    assert set(model.trained_parts()) == {trained}


def test_tiny_enc_trains_the_unet_and_cond_dropout_one_never_trains_on_labels(digits_batch):
    import tensorflow as tf

    # tiny has no pretrained UNet: its enc stage trains the UNet from scratch too.
    model = DiffusionTrainer.from_preset("tiny", num_classes=10, image_size=8, stage="enc")
    trainable = {id(v) for v in model.trainable_variables}
    assert {id(v) for v in model.unet.weights if v.trainable} <= trainable
    assert set(model.trained_parts()) == {"class_encoder", "unet"}

    images, labels = (keras.ops.convert_to_tensor(a) for a in digits_batch)
    for p, expect_zero in ((1.0, True), (0.0, False)):
        model.cond_dropout = p
        with tf.GradientTape() as tape:
            loss = model.diffusion_loss(images, labels)
        grad = tape.gradient(loss, model.class_encoder.dense1.kernel.value)
        assert float(loss) > 0
        assert (float(tf.reduce_max(tf.abs(grad))) == 0.0) is expect_zero


# ----- the script ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.scripts_without_graph_optimizer  # tests/conftest.py
def test_enc_killed_resumes_without_redoing_epochs_then_dif(tmp_path, run_script, monkeypatch):
    folder = tmp_path / "Checkpoints" / "DDPM" / "Exp_0" / "digits" / "MyEmbedding"
    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(REPO / "SD_adapting.py"), *ENC], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ck.weights_path(folder, 1).exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ck.weights_path(folder, 1).exists() and not ck.weights_path(folder, 3).exists()
    killed_at = ck.resumable_epoch(folder)

    resumed = run_script("SD_adapting.py", *ENC)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming enc training from the checkpoint of epoch {killed_at}" in resumed.stdout
    assert f"epochs {killed_at + 1}..3" in resumed.stdout
    assert csv_epochs(folder / "log.csv") == [1, 2, 3]
    assert ck.saved_epochs(folder) == [1, 2, 3]
    assert [e for e in (1, 2, 3) if ck.optimizer_path(folder, e).exists()] == [3]  # only the newest
    assert all((folder / f"samples_epoch_{e:03d}.png").exists() for e in (1, 2, 3))
    assert list((folder / "logs").rglob("events.out.tfevents.*"))
    with h5py.File(ck.optimizer_path(folder, 3), "r") as f:
        iterations = [f[k][()] for k in f if "iteration" in f[k].attrs["path"]]
    assert iterations == [3 * 9]  # 3 epochs x ceil(1077 / 128) steps: no epoch trained twice
    with h5py.File(ck.weights_path(folder, 3), "r") as f:
        assert set(f.keys()) == {"class_encoder", "unet"}  # tiny: the UNet trained here too

    again = run_script("SD_adapting.py", *ENC)
    assert again.returncode == 0 and "already complete" in again.stdout

    other = run_script("SD_adapting.py", *ENC, "--lr", "0.01")
    assert other.returncode == 2
    assert error_lines(other.stderr) == [
        f"error: {folder} holds checkpoints made with lr={get_preset('tiny').enc_lr}, not 0.01; "
        "use another --exp or the same settings"]

    # dif: the class encoder of epoch 2, frozen; the UNet continues from the enc stage's.
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    dif = ["--dataset", "digits", "--preset", "tiny", "--train_model", "dif", "--epochs", "3",
           "--batch_size", "256", "--grid_per_class", "1", "--grid_freq", "2", "--verbose", "0"]
    # The paper's default: the preset's last encoder epoch (tiny: 15), which this run does not have.
    with pytest.raises(CheckpointError, match=r"no class-encoder checkpoint for epoch 15 .*epochs there: 1, 2, 3\); "
                                              r"--enc_epoch defaults to the tiny preset's last encoder epoch, 15"):
        SD_adapting.main(dif)
    with pytest.raises(CheckpointError, match=r"no class-encoder checkpoint for epoch 7 .*epochs there: 1, 2, 3"):
        SD_adapting.main(dif + ["--enc_epoch", "7"])
    with pytest.raises(CheckpointError, match="no fine-tuned UNet checkpoint for epoch 4"):
        SD_adapting.main(dif + ["--enc_epoch", "2", "--dif_epoch", "4"])
    dif_folder = folder.parent / "DiffusionFt"
    assert not dif_folder.exists()
    assert SD_adapting.main(dif + ["--enc_epoch", "2"]) == 0
    assert ck.saved_epochs(dif_folder) == [1, 2, 3]
    # Grids every --grid_freq epochs and at the last, checkpoints every epoch.
    assert sorted(p.name for p in dif_folder.glob("samples_epoch_*.png")) == [
        "samples_epoch_002.png", "samples_epoch_003.png"]
    assert ck.read_settings(dif_folder)["enc_epoch"] == 2
    with h5py.File(ck.weights_path(dif_folder, 1), "r") as f:
        assert set(f.keys()) == {"unet"}
    # Generation refuses a UNet fine-tuned with another class encoder.
    with pytest.raises(CheckpointError, match="fine-tuned with the class encoder of epoch 2"):
        ck.resolve_generation_checkpoints("tiny", get_spec("digits"), 0, 3, 1)


# ----- --random_flip ----------------------------------------------------------------------------
def test_random_flip_mirrors_half_the_images_the_same_way_in_a_resumed_epoch():
    from Models.diffusion.trainer import TrainBatches

    images = np.random.default_rng(0).integers(0, 256, (200, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(200) % 4
    plain = TrainBatches(images, labels, 64, 6, seed=3)
    flipped = TrainBatches(images, labels, 64, 6, seed=3, random_flip=True)
    mirrored_per_epoch = []
    for epoch in range(3):
        assert np.array_equal(plain.order, flipped.order)  # the flips do not change the data order
        mirrored = []
        for i in range(len(plain)):
            ((a, label_a),), ((b, label_b),) = plain[i], flipped[i]
            assert np.array_equal(label_a, label_b)
            same = [np.array_equal(x, y) for x, y in zip(a, b)]
            mirror = [np.array_equal(x[:, ::-1], y) for x, y in zip(a, b)]
            assert all(s or m for s, m in zip(same, mirror))  # each image as it is, or mirrored left-right
            mirrored += mirror
        assert 0.35 < np.mean(mirrored) < 0.65, np.mean(mirrored)
        mirrored_per_epoch.append(mirrored)
        # A run resumed at this epoch (callbacks.EpochSeeds) sees the same images.
        resumed = TrainBatches(images, labels, 64, 6, seed=3, epoch=epoch, random_flip=True)
        assert all(np.array_equal(resumed[i][0][0], flipped[i][0][0]) for i in range(len(plain)))
        plain.on_epoch_end()
        flipped.on_epoch_end()
    assert mirrored_per_epoch[0] != mirrored_per_epoch[1]  # drawn again each epoch


def test_balanced_sampling_draws_every_class_equally_often_and_the_same_draws_in_a_resumed_epoch():
    from Models.diffusion.trainer import TrainBatches

    labels = np.repeat([0, 1, 2], [300, 60, 20])  # imbalanced 15 : 3 : 1
    # Each image holds its own index, so a batch's images can be checked against its labels.
    images = np.zeros((len(labels), 4, 4, 1), np.uint16)
    images[:, 0, 0, 0] = np.arange(len(labels))
    plain = TrainBatches(images, labels, 64, 4, seed=5)
    balanced = TrainBatches(images, labels, 64, 4, seed=5, balanced_sampling=True)
    assert len(balanced) == len(plain) == 6  # an epoch is still N images
    drawn = []
    for epoch in range(20):
        assert sorted(plain.order) == list(range(len(labels)))  # without the option: a permutation, as before
        epoch_labels = []
        for i in range(len(balanced)):
            ((batch, batch_labels),) = balanced[i]
            assert np.array_equal(labels[batch[:, 0, 0, 0]], batch_labels)  # each image with its own label
            epoch_labels.append(batch_labels)
        epoch_labels = np.concatenate(epoch_labels)
        assert len(epoch_labels) == len(labels)
        resumed = TrainBatches(images, labels, 64, 4, seed=5, epoch=epoch, balanced_sampling=True)
        assert np.array_equal(resumed.order, balanced.order)  # a run resumed here draws the same images
        drawn.append(balanced.order.copy())
        plain.on_epoch_end()
        balanced.on_epoch_end()
    drawn = np.concatenate(drawn)
    shares = np.bincount(labels[drawn], minlength=3) / len(drawn)
    # 7,600 draws, 1/3 each: the standard error is 0.5 points; the data itself has 79 / 16 / 5 %.
    assert np.all(np.abs(shares - 1 / 3) < 0.025), shares
    # The rare class's 20 images are drawn with replacement, each about as often as the others.
    rare = np.bincount(drawn[labels[drawn] == 2], minlength=len(labels))[300 + 60:]
    assert rare.min() > 0.5 * rare.mean(), rare


def test_random_flip_balanced_sampling_and_lr_warmup_change_the_training_and_are_part_of_the_checkpoints_identity(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    short = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--epochs", "1",
             "--batch_size", "60", "--train_subset", "120", "--grid_per_class", "0", "--verbose", "0"]
    assert SD_adapting.main(short + ["--exp", "1", "--random_flip"]) == 0
    assert SD_adapting.main(short + ["--exp", "2"]) == 0
    assert SD_adapting.main(short + ["--exp", "3", "--balanced_sampling"]) == 0
    assert SD_adapting.main(short + ["--exp", "4", "--lr_warmup_steps", "1"]) == 0
    folders = {exp: tmp_path / "Checkpoints" / "DDPM" / f"Exp_{exp}" / "digits" / "MyEmbedding" for exp in (1, 2, 3, 4)}
    recorded = {exp: ck.read_settings(folders[exp]) for exp in folders}
    assert [recorded[exp]["random_flip"] for exp in (1, 2, 3, 4)] == [True, False, False, False]
    assert [recorded[exp]["balanced_sampling"] for exp in (1, 2, 3, 4)] == [False, False, True, False]
    assert [recorded[exp]["lr_warmup_steps"] for exp in (1, 2, 3, 4)] == [0, 0, 0, 1]

    def unet(exp):
        with h5py.File(ck.weights_path(folders[exp], 1), "r") as f:
            return np.concatenate([f["unet"][k][()].ravel() for k in sorted(f["unet"])])

    # Same seed; other images (mirrored, or drawn with replacement): two steps apart by far more
    # than float rounding.
    assert np.max(np.abs(unet(1) - unet(2))) > 1e-4
    assert np.max(np.abs(unet(3) - unet(2))) > 1e-4
    # The warmup's first step has a learning rate of 0: of the epoch's two steps only the second moves
    # the weights, by less than the two of an unwarmed run.
    assert np.max(np.abs(unet(4) - unet(2))) > 1e-4

    # A folder's checkpoints were made with (or without) the option: continuing otherwise is an error.
    with pytest.raises(CheckpointError, match=r"random_flip=True, not False"):
        SD_adapting.main(short + ["--exp", "1"])
    with pytest.raises(CheckpointError, match=r"random_flip=False, not True"):
        SD_adapting.main(short + ["--exp", "2", "--random_flip"])
    with pytest.raises(CheckpointError, match=r"balanced_sampling=True, not False"):
        SD_adapting.main(short + ["--exp", "3"])
    with pytest.raises(CheckpointError, match=r"lr_warmup_steps=1, not 0"):
        SD_adapting.main(short + ["--exp", "4"])
    # A settings.json written before the flags existed was made without them.
    settings = ck.read_settings(folders[2])
    del settings["random_flip"], settings["balanced_sampling"], settings["lr_warmup_steps"]
    from Pipeline.adapt import AdaptSettings, plan
    from Utils.io import atomic_write_json

    atomic_write_json(folders[2] / ck.SETTINGS_FILE, settings)

    assert plan(AdaptSettings.from_argv(short + ["--exp", "2"])).start == 1
    with pytest.raises(CheckpointError, match=r"random_flip=False, not True"):
        plan(AdaptSettings.from_argv(short + ["--exp", "2", "--random_flip"]))
    with pytest.raises(CheckpointError, match=r"balanced_sampling=False, not True"):
        plan(AdaptSettings.from_argv(short + ["--exp", "2", "--balanced_sampling"]))
    with pytest.raises(CheckpointError, match=r"lr_warmup_steps=0, not 5"):
        plan(AdaptSettings.from_argv(short + ["--exp", "2", "--lr_warmup_steps", "5"]))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, run_script, monkeypatch):
    result = run_script("SD_adapting.py", "--dataset", "nosuch", "--train_model", "enc", "--preset", "tiny")
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1 and "unknown dataset 'nosuch'" in result.stderr
    for argv, message in [
        (["--preset", "sd9"], "unknown diffusion preset"),
        (["--train_model", "dif", "--enc_epoch", "1"], "no class-encoder checkpoint for epoch 1"),
        (["--dif_epoch", "1"], "--dif_epoch is for --train_model dif"),
        (["--enc_epoch", "5"], "no class-encoder checkpoint for epoch 5"),
        # 2 epochs of digits' 1,077 training images at batch 256: 10 steps.
        (["--epochs", "2", "--batch_size", "256", "--lr_warmup_steps", "10"],
         "--lr_warmup_steps 10: the run has 10 steps (2 epochs of 5 batches); warm up over fewer"),
    ]:
        monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
        with pytest.raises(InputError, match=re.escape(message)):
            SD_adapting.main(["--dataset", "digits", "--train_model", "enc", "--preset", "tiny"] + argv)
    assert not (tmp_path / "Checkpoints").exists()
