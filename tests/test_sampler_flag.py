"""--sampler on generate_dataset.py, hyp_opt.py and reproduce.py; --search_samplers on the studies.

The default is DDIM, the paper's; the names are the registry's (`schedulers.SAMPLERS`).
generate_dataset.py records the sampler in the manifest and a data set made with another
sampler is not "done"; a study can search the sampler as a categorical, and the winner's
sampler reaches the generate stage. Bad names are one line, exit 2, nothing written.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import generate_dataset
import hyp_opt
import reproduce
from Models.diffusion.schedulers import DEFAULT_SAMPLER, SAMPLERS
from Pipeline import tune, tuning
from Pipeline.generate import GenerateSettings, is_done
from Pipeline.stages import BUDGETS, Pipeline
from Pipeline.tuning.space import build_search_space
from Utils.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def _one_line_exit_2(script, *args, root):
    done = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=root,
                          env=dict(os.environ, SDDG_OUTPUT_ROOT=str(root)), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not any(root.iterdir()), list(root.rglob("*"))
    return lines[0]


def test_the_default_is_ddim_and_every_registered_name_parses():
    assert DEFAULT_SAMPLER == "ddim"
    for parser, cls in ((generate_dataset.parser, GenerateSettings), (hyp_opt.parser, tune.TuneSettings),
                        (reproduce.parser, reproduce.ReproduceSettings)):
        assert cls.from_namespace(parser.parse_args([])).sampler == "ddim"
        for name in SAMPLERS:
            settings = cls.from_namespace(parser.parse_args(["--sampler", name]))
            assert settings.sampler == name and cls.from_argv(settings.to_argv()) == settings


@pytest.mark.parametrize("script, args", [
    ("generate_dataset.py", ["--dataset", "digits", "--preset", "tiny", "--img_total", "10", "--sampler", "heun"]),
    ("hyp_opt.py", ["--dataset", "digits", "--preset", "tiny", "--sampler", "heun"]),
    ("hyp_opt.py", ["--dataset", "digits", "--preset", "tiny", "--search_samplers", "ddim", "heun"]),
    ("reproduce.py", ["--sampler", "heun"]),
])
def test_an_unknown_sampler_is_one_line_exit_2_and_nothing_written(tmp_path, script, args):
    line = _one_line_exit_2(script, *args, root=tmp_path)
    assert "heun" in line and "dpmsolver++" in line


def test_eta_is_ddims_and_search_samplers_needs_a_study():
    with pytest.raises(UserError, match="--eta is DDIM's"):
        GenerateSettings(dataset="digits", sampler="euler", eta=0.5)
    with pytest.raises(UserError, match="--search_samplers needs a study"):
        tune.TuneSettings(dataset="digits", optimize=False, search_samplers=("ddim", "unipc"))


def test_generate_records_the_sampler_and_another_sampler_is_another_data_set(tiny_checkpoints, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    out = tmp_path / "out"
    args = ["--dataset", "digits", "--preset", "tiny", "--enc_epoch", "1", "--dif_epoch", "0", "--inf_steps", "3",
            "--img_total", "10", "--batch_size", "5", "--out_dir", str(out)]
    assert generate_dataset.main([*args, "--sampler", "dpmsolver++"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["sampler"] == "dpmsolver++"
    parse = generate_dataset.parser.parse_args
    assert is_done(GenerateSettings.from_namespace(parse([*args, "--sampler", "dpmsolver++"])))
    assert is_done(GenerateSettings.from_namespace(parse(args))) is None  # DDIM: not this data set
    # A manifest written before the sampler was recorded is DDIM's: done, and an unfinished one resumes.
    del manifest["settings"]["sampler"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert is_done(GenerateSettings.from_namespace(parse(args)))
    (out / "class_00" / "img_0.png").unlink()
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert generate_dataset.main(args) == 0
    assert (out / "class_00" / "img_0.png").is_file()
    assert "sampler" not in json.loads((out / "manifest.json").read_text())["settings"]


def test_search_space_with_samplers_is_a_categorical_and_off_by_default():
    paper = build_search_space("enc", [1, 2])
    assert paper.samplers == () and "sampler" not in paper.describe()
    space = build_search_space("enc", [1, 2], samplers=("ddim", "unipc", "ddim"))
    assert space.samplers == ("ddim", "unipc") and space.describe().endswith("sampler in {ddim, unipc}")
    drawn = space.suggest(optuna.trial.FixedTrial({"inf_steps": 7, "ugs": 1.0, "enc_epoch": 2, "sampler": "unipc"}))
    assert drawn == {"inf_steps": 7, "ugs": 1.0, "enc_epoch": 2, "sampler": "unipc"}
    assert space.clip({"inf_steps": 99, "ugs": 1.0, "enc_epoch": 2})["sampler"] == "ddim"


def test_a_study_searches_the_sampler_and_its_winner_reaches_the_generate_stage(tiny_checkpoints, tmp_path,
                                                                                 monkeypatch):
    shutil.copytree(tiny_checkpoints / "Checkpoints", tmp_path / "Checkpoints")
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    settings = tune.TuneSettings(dataset="digits", train_model="enc", exp="0", preset="tiny", n_trials=2,
                                 num_imgs=20, classifier_epochs=1, batch_size=32, max_steps=5,
                                 search_samplers=("euler", "unipc"), enqueue_defaults=True)
    result = tune.run(settings, log=lambda _: None)
    storage = tuning.open_storage(tuning.default_storage_url("0", "digits"))
    study = optuna.load_study(study_name=tuning.tuning_study_name("digits", "0", "enc"), storage=storage)
    assert all(trial.params["sampler"] in ("euler", "unipc") for trial in study.trials)
    assert study.trials[0].params["sampler"] == "euler"  # the default trial: the first listed
    assert result.sampler in ("euler", "unipc") and result.settings["sampler"] == result.sampler
    assert study.user_attrs["protocol"]["search_samplers"] == ["euler", "unipc"]

    # reproduce.py's chain: the studies get the flags, generation takes study #2's winner's sampler.
    pipeline = Pipeline("digits", "tiny", BUDGETS["quick"], sampler="unipc", search_samplers=("ddim", "unipc"))
    tuned = pipeline.tune_settings("enc", optimize=True)
    assert tuned.sampler == "unipc" and tuned.search_samplers == ("ddim", "unipc")
    assert pipeline.tune_settings("enc", optimize=False).search_samplers is None
    tuning.record_pipeline("0", "digits", "dif", "opt", {"settings": {"inf_steps": 4, "ugs": 1.0, "dif_epoch": 1,
                                                               "sampler": "euler"}})
    generate = pipeline.generate_settings()
    assert generate.sampler == "euler" and (generate.inf_steps, generate.enc_epoch) == (4, result.epoch)
