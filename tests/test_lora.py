"""LoRA fine-tuning of the UNet (Models/diffusion/lora.py, SD_adapting.py --unet_tuning lora).

- zero-initialised adapters (B = 0) leave the UNet's output exactly unchanged;
- training changes the adapters only: every other weight is bit-identical after a few steps;
- the merged UNet (base kernels + alpha / rank * A @ B) computes what the adapted one does;
- the exported `pytorch_lora_weights.safetensors`, read by diffusers' own LoRA loader into a
  diffusers UNet (PEFT), gives our output;
- SD_adapting.py's LoRA run: settings.json, adapter-only checkpoints, a killed run resumes,
  generation loads base + adapters merged.
"""

import os
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from Models.diffusion import checkpoints as ck
from Models.diffusion import lora
from Models.diffusion.optimizer import make_optimizer
from Models.diffusion.presets import get_preset
from Models.diffusion.trainer import DiffusionTrainer
from Models.diffusion.unet import build_unet, timestep_embedding

RANK = 4


def _inputs(unet, preset, size, seed=0, batch=2, context_length=None):
    rng = np.random.default_rng(seed)
    channels = int(unet.inputs[0].shape[-1])
    length = context_length or preset.context_length
    x = rng.standard_normal((batch, size, size, channels)).astype("float32")
    context = rng.standard_normal((batch, length, preset.context_dim)).astype("float32")
    timesteps = np.array([999, 1] * (batch // 2))
    return x, timesteps, context


def _predict(unet, preset, inputs):
    x, timesteps, context = inputs
    t_emb = timestep_embedding(ops.convert_to_tensor(timesteps), preset.timestep_embedding_dim)
    return np.asarray(unet([ops.convert_to_tensor(x), t_emb, ops.convert_to_tensor(context)]))


def _randomise_b(adapters, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    for layer in adapters.layers:
        layer.lora_kernel_b.assign(scale * rng.standard_normal(layer.lora_kernel_b.shape).astype("float32"))


@pytest.fixture
def tiny_trainer():
    keras.utils.set_random_seed(0)
    return DiffusionTrainer.from_preset("tiny", num_classes=3, image_size=8, stage="dif", image_channels=1)


def test_zero_initialised_adapters_leave_the_unet_exactly_unchanged(tiny_trainer):
    preset, unet = tiny_trainer.preset, tiny_trainer.unet
    inputs = _inputs(unet, preset, 8)
    before = _predict(unet, preset, inputs)
    adapters = lora.add_adapters(unet, RANK)
    # q, k, v, out of both attentions of every transformer block
    transformers = [layer for layer in unet.layers if type(layer).__name__ == "SpatialTransformer"]
    assert transformers and len(adapters.layers) == 8 * len(transformers)
    assert all(not np.any(ops.convert_to_numpy(layer.lora_kernel_b)) for layer in adapters.layers)
    assert np.array_equal(_predict(unet, preset, inputs), before)


def test_only_the_adapters_train_and_the_merged_unet_equals_the_adapted_one(tiny_trainer):
    model = tiny_trainer
    base_values = [np.array(v) for v in model.unet.get_weights()]
    adapters = lora.add_adapters(model.unet, RANK, alpha=8.0)
    model.set_stage("dif")
    adapter_ids = {id(v) for v in adapters.weights}
    assert {id(v) for v in model.trainable_variables} == adapter_ids
    assert list(model.trained_parts()) == [lora.ADAPTERS_PART]

    frozen = [(v.path, np.array(v)) for v in model.weights if id(v) not in adapter_ids]
    trained_before = [np.array(v) for v in adapters.weights]
    from Data.loaders import load_dataset

    splits = load_dataset("digits")
    model.compile(optimizer=make_optimizer(1e-2, 10, ema_decay=0.9, ema_warmup=False))
    model.fit((splits.x_train[:32], splits.y_train[:32]), batch_size=8, epochs=1, verbose=0, shuffle=False)
    for path, value in frozen:
        assert np.array_equal(np.array(next(v for v in model.weights if v.path == path)), value), path
    changed = [not np.array_equal(np.array(v), before) for v, before in zip(adapters.weights, trained_before)]
    assert all(changed), "every A and B moves (B from zero)"

    # Merged: a plain UNet with the base weights, plus alpha / rank * A @ B in each kernel.
    preset = model.preset
    inputs = _inputs(model.unet, preset, 8, seed=1)
    adapted = _predict(model.unet, preset, inputs)
    plain = build_unet(preset, 8, image_channels=1)
    plain.set_weights(base_values)
    assert np.abs(_predict(plain, preset, inputs) - adapted).max() > 1e-3  # the adapters matter
    lora.merge_adapters(plain, [np.array(v) for v in adapters.weights], alpha=8.0)
    assert np.abs(_predict(plain, preset, inputs) - adapted).max() < 1e-5


def test_merge_refuses_adapters_of_another_unet(tiny_trainer):
    from Models.errors import CheckpointError

    adapters = lora.add_adapters(tiny_trainer.unet, RANK)
    values = [np.array(v) for v in adapters.weights]
    plain = build_unet("tiny", 8, image_channels=1)
    with pytest.raises(CheckpointError, match="adapters do not fit"):
        lora.merge_adapters(plain, values[:-2], alpha=4.0)


# ----- the PyTorch side: diffusers' loader with PEFT --------------------------------------------
def test_exported_adapters_load_into_a_diffusers_unet_with_the_same_output(tmp_path):
    from conftest import require_module

    torch = require_module("torch")
    diffusers = require_module("diffusers")
    require_module("peft")
    torch.set_num_threads(1)
    from test_diffusers_parity import CONTEXT_LENGTH, SD1_LAYOUT, _diffusers_unet, _nchw, _nhwc, _state

    from Models.diffusion import diffusers_convert as dc

    model = _diffusers_unet(SD1_LAYOUT)
    preset = dc.unet_preset_from_config(dict(model.config))
    unet = build_unet(preset, image_size=128, context_length=CONTEXT_LENGTH)
    dc.load_unet_weights(unet, preset, _state(model))
    keras.utils.set_random_seed(3)
    adapters = lora.add_adapters(unet, RANK, alpha=2.0)  # alpha != rank: the export folds the scale in
    _randomise_b(adapters, seed=4)
    path = lora.save_diffusers_lora(unet, preset, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    # What StableDiffusionPipeline.load_lora_weights does for the UNet: read the file, load it with PEFT.
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path.parent))
    assert len(state) == 2 * len(adapters.layers)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=model)
    lora_modules = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert len(lora_modules) == len(adapters.layers)

    inputs = _inputs(unet, preset, 16, context_length=CONTEXT_LENGTH)
    ours = _predict(unet, preset, inputs)
    x, timesteps, context = inputs
    with torch.no_grad():
        theirs = _nhwc(model(_nchw(x), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
        model.disable_adapters()
        base = _nhwc(model(_nchw(x), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    assert np.abs(theirs - base).max() > 1e-3  # the adapters change diffusers' output too
    assert np.abs(ours - theirs).max() < 1e-4


# ----- SD_adapting.py --unet_tuning lora ---------------------------------------------------------
ENC = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--epochs", "1",
       "--batch_size", "256", "--grid_per_class", "0", "--verbose", "0"]
DIF = ["--dataset", "digits", "--preset", "tiny", "--train_model", "dif", "--enc_epoch", "1", "--epochs", "2",
       "--batch_size", "256", "--grid_per_class", "1", "--verbose", "0", "--ema_decay", "0.9",
       "--unet_tuning", "lora", "--lora_rank", "2", "--lora_alpha", "3", "--lr", "1e-2"]


def _arrays(path, group=None):
    with h5py.File(path, "r") as f:
        node = f[group] if group else f
        out = {}
        node.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        return out


def _runs(root):
    """enc once, then the LoRA dif run uninterrupted and killed after epoch 1 and run again."""
    import SD_adapting
    from Models.diffusion.callbacks import Checkpointer

    folders, enc_folder = {}, None
    for run in ("uninterrupted", "killed"):
        os.environ["SDDG_OUTPUT_ROOT"] = str(Path(root) / run)
        if enc_folder is None:
            assert SD_adapting.main(ENC) == 0
            enc_folder = ck.diffusion_checkpoint_dir(0, "digits", "enc")
        else:  # both dif runs start from the same enc checkpoints: copied, not trained again
            shutil.copytree(enc_folder, ck.diffusion_checkpoint_dir(0, "digits", "enc"))
        folders[run] = ck.diffusion_checkpoint_dir(0, "digits", "dif")
        if run == "uninterrupted":
            assert SD_adapting.main(DIF) == 0
            continue
        save = Checkpointer.on_epoch_end

        def killed_after_first_checkpoint(self, epoch, logs=None):
            save(self, epoch, logs)
            raise KeyboardInterrupt

        Checkpointer.on_epoch_end = killed_after_first_checkpoint
        try:
            with pytest.raises(KeyboardInterrupt):
                SD_adapting.main(DIF)
        finally:
            Checkpointer.on_epoch_end = save
        assert ck.resumable_epoch(folders[run]) == 1
        assert SD_adapting.main(DIF) == 0
    return folders


@pytest.mark.slow
def test_lora_fine_tuning_checkpoints_adapters_resumes_and_generates_merged(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    folders = _runs(tmp_path)
    folder = folders["uninterrupted"]
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path / "uninterrupted"))
    settings = ck.read_settings(folder)
    assert (settings["unet_tuning"], settings["lora_rank"], settings["lora_alpha"]) == ("lora", 2, 3.0)

    # Checkpoints hold the adapters alone (the averages), the training state their trained values.
    weights = _arrays(ck.weights_path(folder, 2))
    assert {name.split("/")[0] for name in weights} == {lora.ADAPTERS_PART}
    tiny_unet_size = sum(v.size for v in build_unet("tiny", 8, image_channels=1).get_weights())
    assert sum(v.size for v in weights.values()) < tiny_unet_size / 5
    assert (folder / "samples_epoch_002.png").exists()

    # The killed run resumed to the same adapters, to the last bit.
    resumed = _arrays(ck.weights_path(folders["killed"], 2))
    assert resumed.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    trained = _arrays(ck.optimizer_path(folder, 2), f"{ck.TRAINED_GROUP}/{lora.ADAPTERS_PART}")
    assert len(trained) == len(weights)

    # Generation: base (the enc checkpoint's UNet) + the adapters, merged, computes the adapted UNet.
    from Data.registry import get_spec

    spec = get_spec("digits")
    generator, used = ck.load_generation_model("tiny", spec, "0", enc_epoch=1, dif_epoch=2)
    assert used["dif"] == str(ck.weights_path(folder, 2))
    assert not lora.has_adapters(generator.backbone.unet)
    adapted = ck.build_backbone("tiny", spec, init_seed=0)
    ck.load_parts(used["enc"], ck.enc_parts(adapted))
    lora.add_adapters(adapted.unet, 2, 3.0)
    ck.load_parts(used["dif"], {lora.ADAPTERS_PART: lora.Adapters(adapted.unet)})
    preset = get_preset("tiny")
    inputs = _inputs(adapted.unet, preset, 8, seed=5)
    merged = _predict(generator.backbone.unet, preset, inputs)
    assert np.abs(merged - _predict(adapted.unet, preset, inputs)).max() < 1e-5

    # The PyTorch export of a checkpoint: diffusers' key names, A and B of every adapter.
    import convert_diffusers
    from safetensors.numpy import load_file

    assert convert_diffusers.main(["lora-to-diffusers", "--dataset", "digits", "--dif_epoch", "2",
                                   "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / lora.LORA_WEIGHTS_NAME))
    assert len(exported) == len(weights)
    assert all(key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in exported)
    assert any(".attn2.to_out.0.lora_B." in key for key in exported)

    # A full fine-tuning run cannot continue these checkpoints.
    import SD_adapting
    from Models.errors import CheckpointError

    full = DIF[:DIF.index("--unet_tuning")] + DIF[DIF.index("--lr"):]  # the same run without the LoRA flags
    with pytest.raises(CheckpointError, match="unet_tuning='lora'"):
        SD_adapting.main(full)


def test_lora_flags_are_checked_before_anything_is_written(tmp_path, monkeypatch):
    import SD_adapting
    from Utils.errors import InputError

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    with pytest.raises(InputError, match="--unet_tuning lora is for --train_model dif"):
        SD_adapting.main([*ENC, "--unet_tuning", "lora"])
    with pytest.raises(InputError, match="are for --unet_tuning lora"):
        SD_adapting.main([*ENC, "--lora_rank", "8"])
    for bad in (["--lora_rank", "0"], ["--lora_alpha", "nan"], ["--lora_alpha", "-1"], ["--unet_tuning", "dora"]):
        with pytest.raises(SystemExit):
            SD_adapting.main([*DIF, *bad])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.scripts_without_graph_optimizer  # tests/conftest.py
def test_reproduce_with_lora_fine_tuning_runs_to_a_report(tmp_path):
    import json
    import subprocess
    import sys

    from test_reproduce import REPO, TINY_BUDGET_ON_A_SUBSET, _env

    command = [sys.executable, str(REPO / "reproduce.py"), *TINY_BUDGET_ON_A_SUBSET,
               "--unet_tuning", "lora", "--lora_rank", "2"]
    done = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "Experiments" / "Exp_0" / "digits"
    report = (experiment / "REPORT.md").read_text()
    assert "**UNet fine-tuning:** LoRA adapters (rank 2, alpha 2)" in report
    stage_log = json.loads((experiment / "stages.json").read_text())
    assert "--unet_tuning lora --lora_rank 2" in stage_log["dif"]["command"]
    assert "--unet_tuning" not in stage_log["enc"]["command"]
    dif = tmp_path / "Checkpoints" / "DDPM" / "Exp_0" / "digits" / "DiffusionFt"
    assert json.loads((dif / "settings.json").read_text())["unet_tuning"] == "lora"
    cas = json.loads((tmp_path / "CAS Results" / "test_accuracies_exp0.json").read_text())["digits"]
    assert {"real", "x1"} <= set(cas)


def test_reproduce_refuses_lora_flags_without_lora(tmp_path):
    import subprocess
    import sys

    from test_reproduce import REPO, _env

    done = subprocess.run([sys.executable, str(REPO / "reproduce.py"), "--lora_alpha", "8"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --lora_rank and --lora_alpha are for --unet_tuning lora"]
    assert not any(tmp_path.iterdir())
