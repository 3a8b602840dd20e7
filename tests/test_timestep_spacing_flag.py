"""--timestep_spacing at generation: generate_dataset.py, hyp_opt.py and reproduce.py.

The spacing places the sampling timesteps only (the UNet never sees it in
training), so generation may choose another than the one the checkpoints record,
as diffusers' `Scheduler.from_config(config, timestep_spacing=...)` does. It reaches
the sampler's host tables, not the compiled loop; the manifest names it when it
overrides the checkpoint's, and a set made with another spacing is another set.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import generate_dataset
import hyp_opt
import reproduce
from Data.balance import balanced_labels
from Data.errors import DataError
from Models.diffusion import checkpoints as ck
from Models.diffusion.presets import TIMESTEP_SPACINGS
from Models.diffusion.sampler import DiffusionSampler
from Models.diffusion.schedule import NoiseSchedule, ScheduleError
from Models.diffusion.schedulers import SAMPLERS, make_scheduler
from Pipeline import tune, tuning
from Pipeline.generate import GenerateSettings, is_done
from Pipeline.stages import BUDGETS, Pipeline
from Pipeline.tuning.images import DiffusionImageSource

REPO = Path(__file__).resolve().parents[1]


def test_another_spacing_is_a_copy_of_the_schedule_with_only_the_timesteps_moved():
    schedule = NoiseSchedule("squaredcos_cap_v2", "v_prediction")
    assert schedule.with_timestep_spacing(None) is schedule
    assert schedule.with_timestep_spacing("leading") is schedule
    trailing = schedule.with_timestep_spacing("trailing")
    assert trailing.timestep_spacing == "trailing" and schedule.timestep_spacing == "leading"
    assert trailing.config() == {**schedule.config(), "timestep_spacing": "trailing"}
    np.testing.assert_array_equal(trailing.alphas_cumprod, schedule.alphas_cumprod)
    assert list(trailing.ddim_timesteps(4)) == [999, 749, 499, 249]
    with pytest.raises(ScheduleError, match="unknown timestep spacing 'middle'"):
        schedule.with_timestep_spacing("middle")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_sampler_tables_under_an_override_are_those_of_a_schedule_built_with_it(name, tiny_unet):
    schedule = NoiseSchedule("squaredcos_cap_v2", "v_prediction")
    sampler = DiffusionSampler(tiny_unet, schedule, timestep_embedding_dim=32, sampler=name)
    for spacing in TIMESTEP_SPACINGS:
        got = sampler.tables(10, timestep_spacing=spacing)
        want = make_scheduler(name, NoiseSchedule("squaredcos_cap_v2", "v_prediction",
                                                  timestep_spacing=spacing)).tables(10)
        np.testing.assert_array_equal(got.timesteps, want.timesteps)
        np.testing.assert_array_equal(got.model_alpha, want.model_alpha)
        assert got.initial_scale == want.initial_scale
        for key in want.coefficients:
            np.testing.assert_array_equal(got.coefficients[key], want.coefficients[key])
    assert sampler.schedule.timestep_spacing == "leading"  # the override left the sampler's own schedule


@pytest.fixture(scope="module")
def tiny_unet():
    import keras

    from Models.diffusion.unet import build_unet

    keras.utils.set_random_seed(0)
    return build_unet("tiny", image_size=8)


def test_the_same_compiled_loop_samples_with_the_override_as_a_loop_built_for_that_spacing(tiny_unet):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 8, 8, 3)).astype("float32")
    context = rng.standard_normal((2, 4, 64)).astype("float32")
    uncond = np.zeros((1, 4, 64), "float32")
    leading = DiffusionSampler(tiny_unet, NoiseSchedule(), timestep_embedding_dim=32, sampler="unipc")
    trailing = DiffusionSampler(tiny_unet, NoiseSchedule(timestep_spacing="trailing"), timestep_embedding_dim=32,
                                sampler="unipc")
    overridden = leading.sample(noise, context, uncond, 5, 2.0, timestep_spacing="trailing")
    np.testing.assert_allclose(overridden, trailing.sample(noise, context, uncond, 5, 2.0), atol=1e-6)
    assert np.abs(overridden - leading.sample(noise, context, uncond, 5, 2.0)).max() > 1e-3


def test_every_script_parses_the_spacing_and_defaults_to_the_checkpoints():
    for parser, cls in ((generate_dataset.parser, GenerateSettings), (hyp_opt.parser, tune.TuneSettings),
                        (reproduce.parser, reproduce.ReproduceSettings)):
        assert cls.from_namespace(parser.parse_args([])).timestep_spacing is None
        for spacing in TIMESTEP_SPACINGS:
            settings = cls.from_namespace(parser.parse_args(["--timestep_spacing", spacing]))
            assert settings.timestep_spacing == spacing and cls.from_argv(settings.to_argv()) == settings


@pytest.mark.parametrize("script", ["generate_dataset.py", "hyp_opt.py", "reproduce.py"])
def test_an_unknown_spacing_is_one_line_exit_2_and_nothing_written(tmp_path, script):
    extra = ["--img_total", "10"] if script == "generate_dataset.py" else []
    done = subprocess.run([sys.executable, str(REPO / script), "--dataset", "digits", *extra,
                           "--timestep_spacing", "middle"], cwd=tmp_path,
                          env=dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path)), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "middle" in lines[0] and "trailing" in lines[0], done.stderr
    assert not any(tmp_path.iterdir())


def test_generate_records_an_overriding_spacing_and_another_spacing_is_another_data_set(tiny_checkpoints, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    settings_file = tiny_checkpoints / "Checkpoints" / "DDPM" / "Exp_0" / "digits" / "MyEmbedding" / ck.SETTINGS_FILE
    assert json.loads(settings_file.read_text())["timestep_spacing"] == "leading"
    args = ["--dataset", "digits", "--preset", "tiny", "--enc_epoch", "1", "--dif_epoch", "0", "--inf_steps", "3",
            "--img_total", "10", "--batch_size", "5"]
    parse = generate_dataset.parser.parse_args

    def made(name, *more):
        out = tmp_path / name
        assert generate_dataset.main([*args, "--out_dir", str(out), *more]) == 0
        from PIL import Image

        images = np.stack([np.asarray(Image.open(path)) for path in sorted(out.glob("class_*/img_*.png"))])
        return json.loads((out / "manifest.json").read_text())["settings"], images

    default_settings, default_images = made("default")
    spelled_settings, spelled_images = made("leading", "--timestep_spacing", "leading")
    trailing_settings, trailing_images = made("trailing", "--timestep_spacing", "trailing")
    assert "timestep_spacing" not in default_settings and "timestep_spacing" not in spelled_settings
    np.testing.assert_array_equal(spelled_images, default_images)  # the checkpoint's own spacing: the same set
    assert trailing_settings["timestep_spacing"] == "trailing"
    assert np.abs(trailing_images.astype(int) - default_images.astype(int)).max() > 0

    def done(*more):
        return is_done(GenerateSettings.from_namespace(parse([*args, "--out_dir", str(tmp_path / "trailing"),
                                                               *more])))

    assert done("--timestep_spacing", "trailing")
    assert done() is None and done("--timestep_spacing", "linspace") is None
    before = sorted((tmp_path / "trailing").rglob("*"))
    with pytest.raises(DataError, match="made with other settings.*timestep_spacing"):
        generate_dataset.main([*args, "--out_dir", str(tmp_path / "trailing"), "--timestep_spacing", "linspace"])
    assert sorted((tmp_path / "trailing").rglob("*")) == before


def test_a_study_samples_with_the_spacing_and_its_cells_carry_it_to_the_generate_stage(tiny_checkpoints, tmp_path,
                                                                                       monkeypatch):
    shutil.copytree(tiny_checkpoints / "Checkpoints", tmp_path / "Checkpoints")
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    labels = balanced_labels(10, 10)
    settings = {"inf_steps": 3, "ugs": 1.5, "enc_epoch": 1}
    trailing = DiffusionImageSource("0", "digits", "tiny", "enc", timestep_spacing="trailing")
    leading = DiffusionImageSource("0", "digits", "tiny", "enc")
    direct = trailing.model_for(1).generate(labels, num_steps=3, guidance_scale=1.5, seed=0,
                                            timestep_spacing="trailing")
    np.testing.assert_array_equal(trailing(settings, labels, seed=0), direct)
    assert np.abs(leading(settings, labels, seed=0).astype(int) - direct.astype(int)).max() > 0
    np.testing.assert_array_equal(leading({**settings, "timestep_spacing": "trailing"}, labels, seed=0), direct)

    study = tune.TuneSettings(dataset="digits", train_model="enc", preset="tiny", timestep_spacing="trailing")
    assert tune._protocol(study, None, type("P", (), {"name": "tiny"}))["timestep_spacing"] == "trailing"
    assert "timestep_spacing" not in tune._protocol(tune.TuneSettings(dataset="digits"), None,
                                                    type("P", (), {"name": "tiny"}))
    assert tune._with_fixed_choices(settings, study) == {**settings, "timestep_spacing": "trailing"}

    pipeline = Pipeline("digits", "tiny", BUDGETS["quick"], timestep_spacing="trailing")
    assert pipeline.tune_settings("enc", optimize=True).timestep_spacing == "trailing"
    tuning.record_pipeline("0", "digits", "enc", "opt", {"settings": {"inf_steps": 4, "ugs": 1.0, "enc_epoch": 1}})
    tuning.record_pipeline("0", "digits", "dif", "opt", {"settings": {"inf_steps": 4, "ugs": 1.0, "dif_epoch": 1,
                                                                      "timestep_spacing": "trailing"}})
    assert pipeline.generate_settings().timestep_spacing == "trailing"


def test_the_no_opt_row_takes_the_studys_default_trial_when_the_spacing_and_sampler_are_fixed(tiny_checkpoints,
                                                                                              tmp_path, monkeypatch):
    shutil.copytree(tiny_checkpoints / "Checkpoints", tmp_path / "Checkpoints")
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    common = dict(dataset="digits", train_model="enc", exp="0", preset="tiny", num_imgs=20, classifier_epochs=1,
                  batch_size=32, sampler="unipc", timestep_spacing="trailing")
    study = tune.run(tune.TuneSettings(**common, n_trials=1, enqueue_defaults=True), log=lambda _: None)
    lines = []
    default = tune.run(tune.TuneSettings(**common, optimize=False), log=lines.append)
    assert default.settings == study.settings  # the one trial: the default settings, with the fixed choices
    assert default.settings["sampler"] == "unipc" and default.settings["timestep_spacing"] == "trailing"
    assert default.entry["from_trial"]["trial"] == 0 and any("taking its numbers" in line for line in lines)
    assert (default.top1, default.val_accuracy) == (study.top1, study.val_accuracy)
