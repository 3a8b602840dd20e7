"""The diffusers converter without PyTorch: configs -> presets, folders, errors, the command line.

Numerical parity against diffusers itself is in test_diffusers_parity.py; here the
converter's own contract: it never imports torch or diffusers, derives our presets from
the real SD 1.5 / SD 2.1 configs, refuses unsupported configs in one line, names every
missing / unexpected / mismatched tensor without touching the model, and round-trips
our UNet through a diffusers folder exactly (RGB and grey pixel UNets, tiny and small).
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from safetensors.numpy import load_file, save_file

import convert_diffusers
from Models.diffusion import diffusers_convert as dc
from Models.diffusion.presets import get_preset
from Models.diffusion.unet import build_unet, timestep_embedding
from Models.errors import CheckpointError, ModelSettingsError

TINY = get_preset("tiny")
# Three levels, attention at the lowest only (a candidate layout of `small`).
THREE_LEVELS = dataclasses.replace(get_preset("small"), name="three_levels", level_channels=(32, 64, 128),
                                   level_attention=(False, False, True), level_heads=(4, 4, 4))
_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
# The published configs (unet/config.json) of SD 1.5 and SD 2.1, as on the Hugging Face Hub.
SD15_UNET = dict(
    _class_name="UNet2DConditionModel", _diffusers_version="0.6.0", act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    **_SD_BLOCKS,
)
SD21_UNET = dict(
    SD15_UNET, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False, sample_size=96,
    upcast_attention=True, use_linear_projection=True,
)


def _random_weights(model, seed):
    """Every weight random (no constant norms / zero biases), as after training."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.05)


@pytest.fixture(scope="module")
def tiny_unet():
    keras.utils.set_random_seed(0)
    unet = build_unet(TINY, image_size=None)
    _random_weights(unet, 0)
    return unet


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_unet):
    """Our random tiny UNet written as a diffusers pipeline folder (unet/ only)."""
    root = tmp_path_factory.mktemp("pipeline")
    dc.save_unet_as_diffusers(tiny_unet, TINY, root / "unet")
    return root


def test_the_library_imports_neither_torch_nor_diffusers():
    code = ("import sys, Models.diffusion.diffusers_convert, convert_diffusers; "
            "assert not {'torch', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("config, name", [(SD15_UNET, "sd1"), (SD21_UNET, "sd2")])
def test_published_sd_configs_give_our_sd_presets(config, name):
    preset = dc.unet_preset_from_config(config)
    # Ours in all but the GELU: diffusers' is exact, keras-cv's (our sd presets') tanh-approximated.
    assert preset == dataclasses.replace(get_preset(name), gelu_approximate=False)
    assert dc.unet_preset_from_config(config, base=name) == preset
    # and back: our preset's config describes the same UNet
    ours = dc.diffusers_unet_config(preset)
    for key in ("block_out_channels", "cross_attention_dim", "down_block_types", "up_block_types",
                "in_channels", "layers_per_block"):
        assert ours[key] == config[key], key
    assert np.broadcast_to(config["attention_head_dim"], 4).tolist() == ours["attention_head_dim"]
    assert ours["use_linear_projection"] == config.get("use_linear_projection", False)
    # latent UNets have 4 channels whatever the images have
    assert dc.diffusers_unet_config(preset, image_channels=1)["in_channels"] == 4


def test_the_wrong_base_preset_names_every_differing_field():
    with pytest.raises(ModelSettingsError, match=r"not have the sd1 architecture: level_heads: .*"
                                                 r"linear_attention_projection: .*context_dim: config 1024 vs sd1 768"):
        dc.unet_preset_from_config(SD21_UNET, base="sd1")


def test_an_unknown_architecture_keeps_the_nearest_presets_defaults():
    config = dict(SD15_UNET, block_out_channels=[64, 128, 256, 256], norm_num_groups=16)
    preset = dc.unet_preset_from_config(config)
    assert preset.name == "diffusers" and not preset.pretrained and preset.latent
    assert preset.level_channels == (64, 128, 256, 256) and preset.timestep_embedding_dim == 64
    assert preset.context_length == get_preset("sd1").context_length
    assert preset.text_encoder == get_preset("sd1").text_encoder
    # An SD 2.x-like UNet (linear attention projections) keeps sd2's defaults: its text encoder.
    sd2_like = dict(SD21_UNET, block_out_channels=[64, 128, 256, 256], attention_head_dim=[2, 4, 8, 8],
                    norm_num_groups=16)
    preset = dc.unet_preset_from_config(sd2_like)
    assert preset.name == "diffusers" and preset.linear_attention_projection and preset.context_dim == 1024
    assert preset.text_encoder == get_preset("sd2").text_encoder != get_preset("sd1").text_encoder


@pytest.mark.parametrize("change, named", [
    (dict(in_channels=9), "in_channels=9"),  # the inpainting UNet
    (dict(in_channels=2, out_channels=2), "in_channels=2"),
    (dict(in_channels=1, out_channels=3), "in_channels=1, out_channels=3"),
    (dict(addition_embed_type="text_time"), "addition_embed_type='text_time'"),  # SDXL
    (dict(transformer_layers_per_block=[1, 2, 10, 1]), "transformer_layers_per_block"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(up_block_types=["UpBlock2D"] * 4), "does not mirror down_block_types"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), "down_block_types"),
    (dict(layers_per_block=[2, 2, 1, 1]), "layers_per_block"),
    (dict(_class_name="UNet2DModel"), "UNet2DModel"),
])
def test_unsupported_unet_configs_are_one_line_errors(change, named):
    with pytest.raises(ModelSettingsError) as error:
        dc.unet_preset_from_config(dict(SD15_UNET, **change))
    assert named in str(error.value) and "\n" not in str(error.value)


def test_a_preset_diffusers_cannot_express_is_refused():
    odd = dataclasses.replace(TINY, timestep_embedding_dim=64)
    with pytest.raises(ModelSettingsError, match="timestep embedding is 64 wide"):
        dc.diffusers_unet_config(odd)


def test_our_unet_round_trips_exactly_through_a_diffusers_folder(tiny_unet, tiny_folder):
    config, tensors = dc.read_diffusers_model(tiny_folder / "unet")
    assert dc.unet_preset_from_config(config) == TINY
    assert tensors["conv_in.weight"].shape == (32, 3, 3, 3)  # PyTorch (out, in, kh, kw)
    assert tensors["time_embedding.linear_1.weight"].shape == (128, 32)  # Linear (out, in)
    unet = build_unet(TINY, image_size=8)
    dc.load_unet_weights(unet, TINY, tensors)
    for ours, loaded in zip(tiny_unet.weights, unet.weights):
        np.testing.assert_array_equal(ours.numpy(), loaded.numpy())
    rng = np.random.default_rng(0)
    inputs = [ops.convert_to_tensor(rng.standard_normal((1, 8, 8, 3)).astype("float32")),
              timestep_embedding(ops.convert_to_tensor([300]), TINY.timestep_embedding_dim),
              ops.convert_to_tensor(rng.standard_normal((1, 4, 64)).astype("float32"))]
    np.testing.assert_array_equal(np.asarray(tiny_unet(inputs)), np.asarray(unet(inputs)))


@pytest.mark.parametrize("name, channels", [("tiny", 1), ("small", 1), ("small", 3), ("three_levels", 1)])
def test_grey_and_small_unets_round_trip_exactly(tmp_path, name, channels):
    """Pixel UNets keep the dataset's channels both ways; any level layout maps generically."""
    preset = THREE_LEVELS if name == "three_levels" else get_preset(name)
    keras.utils.set_random_seed(1)
    unet = build_unet(preset, image_size=None, image_channels=channels)
    _random_weights(unet, 1)
    written = dc.save_unet_as_diffusers(unet, preset, tmp_path / "unet")
    assert written["in_channels"] == written["out_channels"] == channels
    assert written["down_block_types"] == ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                                           for a in preset.level_attention]
    if name == "three_levels":
        assert written["down_block_types"] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
        assert written["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    config, tensors = dc.read_diffusers_model(tmp_path / "unet")
    assert dc.unet_preset_from_config(config, base=preset) == preset
    derived = dc.unet_preset_from_config(config)
    assert all(getattr(derived, key) == getattr(preset, key) for key in dc.UNET_ARCHITECTURE_FIELDS)
    assert tensors["conv_in.weight"].shape == (32, channels, 3, 3)
    assert tensors["conv_out.weight"].shape == (channels, 32, 3, 3)
    back = build_unet(preset, image_size=8, image_channels=config["in_channels"])
    dc.load_unet_weights(back, preset, tensors)
    rng = np.random.default_rng(1)
    inputs = [ops.convert_to_tensor(rng.standard_normal((1, 8, 8, channels)).astype("float32")),
              timestep_embedding(ops.convert_to_tensor([300]), preset.timestep_embedding_dim),
              ops.convert_to_tensor(rng.standard_normal((1, 4, preset.context_dim)).astype("float32"))]
    np.testing.assert_array_equal(np.asarray(unet(inputs)), np.asarray(back(inputs)))
    # a grey checkpoint does not load into an RGB UNet: the first and last convolutions are named
    if channels == 1:
        with pytest.raises(CheckpointError, match=r"shape mismatch 3: conv_in.weight \(32, 1, 3, 3\) "
                                                  r"\(expected \(32, 3, 3, 3\)\), conv_out.weight .*conv_out.bias"):
            dc.load_unet_weights(build_unet(preset, image_size=8, image_channels=3), preset, tensors)


def test_presets_sharing_an_architecture_take_the_first_and_say_so(tmp_path, tiny_folder, monkeypatch, capsys):
    twin = dataclasses.replace(TINY, name="twin", beta_schedule="squaredcos_cap_v2")
    monkeypatch.setitem(dc.PRESETS, "twin", twin)
    matching = dc.presets_with_architecture(twin)
    assert matching[0] == "tiny" and matching[-1] == "twin"  # in PRESETS order
    config, _ = dc.read_diffusers_model(tiny_folder / "unet")
    assert dc.unet_preset_from_config(config).name == "tiny"
    assert dc.unet_preset_from_config(config, base=twin) == twin
    assert convert_diffusers.main(["to-keras", str(tiny_folder), "--out", str(tmp_path / "out")]) == 0
    assert "share this UNet architecture" in capsys.readouterr().out


def test_missing_unexpected_and_mismatched_tensors_are_named_and_nothing_is_loaded(tiny_folder):
    _, tensors = dc.read_diffusers_model(tiny_folder / "unet")
    del tensors["mid_block.attentions.0.proj_in.weight"]
    tensors["mid_block.attentions.0.proj_in.wieght"] = np.zeros(1, np.float32)
    tensors["conv_out.weight"] = tensors["conv_out.weight"][:, :16]
    unet = build_unet(TINY, image_size=8)
    before = [w.numpy().copy() for w in unet.weights]
    with pytest.raises(CheckpointError) as error:
        dc.load_unet_weights(unet, TINY, tensors)
    message = str(error.value)
    assert "\n" not in message
    assert "missing 1: mid_block.attentions.0.proj_in.weight" in message
    assert "unexpected 1: mid_block.attentions.0.proj_in.wieght" in message
    assert "shape mismatch 1: conv_out.weight (3, 16, 3, 3) (expected (3, 32, 3, 3))" in message
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, unet.weights))


def test_sd1_and_sd2_projections_are_not_interchangeable(tiny_folder):
    """A 1x1-conv checkpoint (SD1) does not load into Dense projections (SD2): named, not reshaped."""
    _, tensors = dc.read_diffusers_model(tiny_folder / "unet")
    linear = dataclasses.replace(TINY, linear_attention_projection=True)
    with pytest.raises(CheckpointError, match=r"shape mismatch 12: .*proj_in.weight \(64, 64, 1, 1\) "
                                              r"\(expected \(64, 64\)\)"):
        dc.load_unet_weights(build_unet(linear, image_size=8), linear, tensors)


def test_half_precision_and_sharded_folders_read_as_float32(tmp_path, tiny_folder):
    _, tensors = dc.read_diffusers_model(tiny_folder / "unet")
    names = sorted(tensors)
    half = {name: tensors[name].astype(np.float16) for name in names}
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        save_file({name: half[name] for name in shard_names}, tmp_path / shard)
    index = {"weight_map": {name: shard for shard, shard_names in shards.items() for name in shard_names}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny_folder / "unet" / "config.json").read_text())
    _, read = dc.read_diffusers_model(tmp_path)
    assert sorted(read) == names and all(value.dtype == np.float32 for value in read.values())
    np.testing.assert_allclose(read["conv_in.weight"], tensors["conv_in.weight"], atol=1e-3)


def test_a_bin_checkpoint_without_torch_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(SD15_UNET))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(CheckpointError, match=r"PyTorch \.bin file and torch is not installed"):
        dc.read_diffusers_model(tmp_path)


def test_folders_without_weights_or_config_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        dc.read_diffusers_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SD15_UNET))
    with pytest.raises(CheckpointError, match="no weights in .*diffusion_pytorch_model.safetensors"):
        dc.read_diffusers_model(tmp_path)


def test_only_stable_diffusions_vae_is_accepted_and_legacy_names_are_read():
    dc.check_autoencoder_config({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
                                 "layers_per_block": 2, "latent_channels": 4, "sample_size": 512})
    with pytest.raises(ModelSettingsError, match=r"scaling_factor=0.13025"):  # SDXL's VAE
        dc.check_autoencoder_config({**dc.VAE_CONFIG, "scaling_factor": 0.13025})
    with pytest.raises(ModelSettingsError, match=r"block_out_channels=\[64\]"):
        dc.check_autoencoder_config({**dc.VAE_CONFIG, "block_out_channels": [64]})
    legacy = {"encoder.mid_block.attentions.0.query.weight": 1, "decoder.mid_block.attentions.0.proj_attn.bias": 2,
              "encoder.conv_in.weight": 3}
    assert dc._modern_vae_names(legacy) == {"encoder.mid_block.attentions.0.to_q.weight": 1,
                                            "decoder.mid_block.attentions.0.to_out.0.bias": 2,
                                            "encoder.conv_in.weight": 3}


def test_command_line_round_trip(tmp_path, tiny_folder):
    out = tmp_path / "keras"
    assert convert_diffusers.main(["to-keras", str(tiny_folder), "--out", str(out), "--preset", "tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["unet.weights.h5", "unet_preset.json"]
    assert json.loads((out / "unet_preset.json").read_text())["name"] == "tiny"
    back = tmp_path / "back"
    assert convert_diffusers.main(["to-diffusers", "--preset", str(out / "unet_preset.json"),
                                   "--unet_weights", str(out / "unet.weights.h5"), "--out", str(back)]) == 0
    original = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    written = load_file(back / "diffusion_pytorch_model.safetensors")
    assert sorted(original) == sorted(written)
    assert all(np.array_equal(original[name], written[name]) for name in original)
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (tiny_folder / "unet" / "config.json").read_text())


def test_command_line_round_trip_of_a_grey_unet(tmp_path):
    """to-keras records the UNet's channels; to-diffusers reads them, or finds them from the weights."""
    keras.utils.set_random_seed(2)
    grey = build_unet(TINY, image_size=None, image_channels=1)
    _random_weights(grey, 2)
    dc.save_unet_as_diffusers(grey, TINY, tmp_path / "grey")
    out = tmp_path / "keras"
    assert convert_diffusers.main(["to-keras", str(tmp_path / "grey"), "--out", str(out)]) == 0
    recorded = json.loads((out / "unet_preset.json").read_text())
    assert recorded["name"] == "tiny" and recorded["unet_channels"] == 1
    original = load_file(tmp_path / "grey" / "diffusion_pytorch_model.safetensors")
    for preset_arg, back in ((str(out / "unet_preset.json"), "from_file"), ("tiny", "found")):
        assert convert_diffusers.main(["to-diffusers", "--preset", preset_arg, "--unet_weights",
                                       str(out / "unet.weights.h5"), "--out", str(tmp_path / back)]) == 0
        assert json.loads((tmp_path / back / "config.json").read_text())["in_channels"] == 1
        written = load_file(tmp_path / back / "diffusion_pytorch_model.safetensors")
        assert sorted(written) == sorted(original)
        assert all(np.array_equal(original[name], written[name]) for name in original)
    with pytest.raises(CheckpointError, match=r"does not fit the tiny UNet \(3 channels\)"):
        convert_diffusers.main(["to-diffusers", "--preset", "tiny", "--image_channels", "3", "--unet_weights",
                                str(out / "unet.weights.h5"), "--out", str(tmp_path / "rgb")])
    assert not (tmp_path / "rgb").exists()


def test_command_line_errors_are_one_line_and_write_nothing(tmp_path, tiny_folder, run_script):
    # a tensor with the wrong shape: named, exit 2, no output folder content
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_folder / "unet" / "config.json").read_text())
    tensors = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    tensors["conv_in.bias"] = np.zeros(7, np.float32)
    save_file(tensors, broken / "diffusion_pytorch_model.safetensors")
    result = run_script("convert_diffusers.py", "to-keras", broken, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "conv_in.bias (7,) (expected (32,))" in last
    assert not (tmp_path / "out").exists()
    # a preset check that fails, and weights that do not fit the preset
    with pytest.raises(ModelSettingsError, match="does not have the sd1 architecture"):
        convert_diffusers.main(["to-keras", str(tiny_folder), "--out", str(tmp_path / "out"), "--preset", "sd1"])
    weights = tmp_path / "w.weights.h5"
    build_unet(dataclasses.replace(TINY, num_res_blocks=1), None).save_weights(weights)
    with pytest.raises(CheckpointError, match="does not fit the tiny UNet"):
        convert_diffusers.main(["to-diffusers", "--preset", "tiny", "--unet_weights", str(weights),
                                "--out", str(tmp_path / "out")])
    with pytest.raises(ModelSettingsError, match="neither a preset"):
        convert_diffusers.main(["to-diffusers", "--preset", "sd9", "--unet_weights", str(weights),
                                "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_install_as_a_fine_tuned_unet_checkpoint(tmp_path, monkeypatch, tiny_folder):
    """to-keras --dataset: the UNet becomes DiffusionFt epoch K beside class-encoder epoch N.

    digits is grey: the installed UNet must have 1 channel; an RGB one is refused.
    """
    import h5py

    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.class_encoder import ClassEncoder
    from Utils.paths import diffusion_checkpoint_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    spec = get_spec("digits")
    keras.utils.set_random_seed(1)
    tiny_unet = build_unet(TINY, image_size=None, image_channels=spec.channels)
    _random_weights(tiny_unet, 1)
    dc.save_unet_as_diffusers(tiny_unet, TINY, tmp_path / "grey_unet")
    args = ["to-keras", str(tmp_path / "grey_unet"), "--dataset", "digits", "--enc_epoch", "3", "--dif_epoch", "2"]
    with pytest.raises(CheckpointError, match="no class-encoder checkpoint for epoch 3"):
        convert_diffusers.main(args)
    enc_dir = diffusion_checkpoint_dir(0, "digits", "enc")
    enc_dir.mkdir(parents=True)
    (enc_dir / "settings.json").write_text(json.dumps({**ck.model_identity(TINY, spec, True, 0), "stage": "enc"}))
    encoder = ClassEncoder(10, TINY.context_length, TINY.context_dim, hidden=TINY.class_encoder_hidden)
    encoder.build((None, 10))
    ck.save_parts(ck.weights_path(enc_dir, 3), {"class_encoder": encoder, "unet": tiny_unet})

    dif_dir = diffusion_checkpoint_dir(0, "digits", "dif")
    with pytest.raises(CheckpointError, match=r"^the diffusers UNet has 3 input channels, the tiny UNet for digits "
                                        r"\(1-channel images\) needs 1$"):
        convert_diffusers.main(["to-keras", str(tiny_folder), *args[2:]])
    assert not dif_dir.exists()
    assert convert_diffusers.main(args) == 0
    settings = json.loads((dif_dir / "settings.json").read_text())
    assert settings["enc_epoch"] == 3 and settings["preset"] == "tiny" and "diffusers" in settings["source"]
    with h5py.File(ck.weights_path(dif_dir, 2), "r") as f:  # checkpoints.py's layout, our weights
        stored = [f["unet"][key][()] for key in sorted(f["unet"])]
    assert len(stored) == len(tiny_unet.weights)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(stored, tiny_unet.weights))
    # generate_dataset.py's own check accepts the pair
    _, used = ck.resolve_generation_checkpoints(TINY, spec, 0, enc_epoch=3, dif_epoch=2)
    assert used["dif"] == str(ck.weights_path(dif_dir, 2))

    with pytest.raises(CheckpointError, match="exists; choose another --dif_epoch"):
        convert_diffusers.main(args)
    with pytest.raises(CheckpointError, match="class encoder .* is for tiny"):
        convert_diffusers.main(args[:-2] + ["--dif_epoch", "5", "--preset", "sd1"])
    # never beside a real fine-tuning (settings.json without this source)
    settings["source"] = None
    (dif_dir / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="made with source=None"):
        convert_diffusers.main(args[:-2] + ["--dif_epoch", "5"])


def test_install_for_a_folder_dataset_of_mixed_sizes_takes_image_size(tmp_path, monkeypatch):
    """to-keras --dataset folder:PATH --image_size N: the spec is read as SD_adapting.py read it."""
    from PIL import Image

    from Data.errors import DataError
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.class_encoder import ClassEncoder
    from Utils.paths import diffusion_checkpoint_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ring", "square"]):
        for i, size in enumerate((8, 10, 8, 10)):
            path = root / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path)
    dataset = f"folder:{root}"
    spec = get_spec(dataset, image_size=8)
    keras.utils.set_random_seed(2)
    unet = build_unet(TINY, image_size=None, image_channels=spec.channels)
    _random_weights(unet, 2)
    dc.save_unet_as_diffusers(unet, TINY, tmp_path / "unet")
    enc_dir = diffusion_checkpoint_dir(0, spec.name, "enc")
    enc_dir.mkdir(parents=True)
    (enc_dir / "settings.json").write_text(json.dumps({**ck.model_identity(TINY, spec, True, 0), "stage": "enc"}))
    encoder = ClassEncoder(2, TINY.context_length, TINY.context_dim, hidden=TINY.class_encoder_hidden)
    encoder.build((None, 2))
    ck.save_parts(ck.weights_path(enc_dir, 1), {"class_encoder": encoder, "unet": unet})

    args = ["to-keras", str(tmp_path / "unet"), "--dataset", dataset, "--enc_epoch", "1"]
    from Data import registry

    monkeypatch.setattr(registry, "_OWN_SPECS", {})  # as in a new process: the size is not remembered
    with pytest.raises(DataError, match="give --image_size"):
        convert_diffusers.main(args)
    assert convert_diffusers.main([*args, "--image_size", "8"]) == 0
    _, used = ck.resolve_generation_checkpoints(TINY, spec, 0, enc_epoch=1, dif_epoch=1)
    assert used["dif"] == str(ck.weights_path(diffusion_checkpoint_dir(0, spec.name, "dif"), 1))
