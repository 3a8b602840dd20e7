"""reproduce.py: the whole pipeline, killed mid-way and resumed; bad input; the report.

The pipeline runs on digits with the tiny preset and a budget cut to the bone
(one diffusion epoch per stage, one trial per study, a few dozen images per
trial, one-epoch classifiers, x1 only): it checks the chaining, skipping and
resuming, not the accuracy (BENCHMARKS.md has real runs). The steps keep the quick
budget's cap (the preset's default), so each study's first trial is the default
settings and the no-optimisation stage takes its numbers: a lower `--max_steps` would
make both no-optimisation stages compute theirs again.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.scripts_without_graph_optimizer  # tests/conftest.py

TINY_BUDGET = ["--preset", "tiny", "--enc_epochs", "1", "--dif_epochs", "1", "--n_trials_enc", "1", "--n_trials_dif", "1",
               "--num_imgs", "30", "--tuning_classifier_epochs", "1", "--classifier_epochs", "1",
               "--classifier_batch_size", "64", "--max_multiple", "1"]
# The end-to-end tests of one feature each (a conditioning method, LoRA, the resume) train, generate and
# score on a stratified 120 of digits' 1,077 training images: every stage still runs, in a fraction of
# the time. The whole split goes through test_learns_digits.py and the README's main command.
TINY_BUDGET_ON_A_SUBSET = [*TINY_BUDGET, "--train_subset", "120"]


def _env(root):
    return dict(os.environ, SDDG_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("args, message", [
    (["--budget", "huge"], "argument --budget: invalid choice: 'huge'"),
    (["--storage", "foo://nowhere"], "cannot open the Optuna storage foo://nowhere"),
    (["--stop_after", "lunch"], "--stop_after 'lunch' is not a stage"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--preset", "sd9"], "unknown diffusion preset 'sd9'"),
    (["--max_multiple", "0"], "--max_multiple: expected a positive integer"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, message):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"
    assert time.perf_counter() - started < 30  # fails before TensorFlow starts


def _stage_lines(text):
    return [line for line in text.splitlines() if re.match(r"^\[\d+/\d+\] ", line)]


@pytest.mark.slow
def test_killed_pipeline_resumes_and_skips_finished_stages(tmp_path):
    """Kill reproduce.py (SIGKILL) while it fine-tunes the UNet; the rerun skips stages 1-3 and completes.

    On a training subset with a seed of its own: the stages before the kill and after it all see (and
    record) the same 120 images, and x1 then means 120 images (tests/test_train_subset.py: the rule).
    """
    command = [sys.executable, str(REPO / "reproduce.py"), *TINY_BUDGET_ON_A_SUBSET, "--train_subset_seed", "1"]
    first = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in first.stdout:
            seen.append(line)
            if line.startswith("[4/") and line.rstrip().endswith("running"):
                time.sleep(3)  # inside SD_adapting's dif stage
                break
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert any(line.startswith("[3/") and "done in" in line for line in seen), "".join(seen)[-3000:]
    stage_log = json.loads((tmp_path / "Experiments" / "Exp_0" / "digits" / "stages.json").read_text())
    assert stage_log["dif"]["status"] == "running" and stage_log["tune_enc"]["status"] == "done"

    second = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = _stage_lines(second.stdout)
    skipped = [line.split()[1].rstrip(":") for line in lines if "skipped" in line]
    ran = [line.split()[1].rstrip(":") for line in lines if line.rstrip().endswith("running")]
    assert skipped[:3] == ["enc", "tune_enc", "enc_default"], lines
    assert ran[:1] == ["dif"] and {"tune_dif", "generate", "cas_real", "cas_x1"} <= set(ran), lines
    report = (tmp_path / "Experiments" / "Exp_0" / "digits" / "REPORT.md").read_text()
    for heading in ("## Classification accuracy score", "## The stage table", "## Tuning", "## Samples",
                    "## How this was made"):
        assert heading in report
    assert re.search(r"^python SD_adapting.py .*--train_model dif", report, re.M)
    cas = json.loads((tmp_path / "CAS Results" / "test_accuracies_exp0.json").read_text())["digits"]
    assert {"real", "x1"} <= set(cas)
    assert (tmp_path / "Experiments" / "Exp_0" / "digits" / "figures" / "samples_generated.png").exists()

    # Every stage, before the kill and after it, on the same seeded subset, and every record says so.
    subset = {"images": 120, "seed": 1}
    for stage in ("MyEmbedding", "DiffusionFt"):
        settings = json.loads((tmp_path / "Checkpoints" / "DDPM" / "Exp_0" / "digits" / stage / "settings.json")
                              .read_text())
        assert settings["train_subset"] == subset, stage
    manifest = json.loads((tmp_path / "Data" / "Synthetic" / "Exp_0" / "digits" / "manifest.json").read_text())
    assert manifest["img_total"] == 120 and manifest["trained_on"]["train_subset"] == subset
    assert manifest["trained_on"]["data_verification"]["status"] == "embedded"
    table = json.loads((tmp_path / "CAS Results" / "pipeline_optimization_exp0.json").read_text())["digits"]
    cells = [cell for stage in table.values() for cell in stage.values()]
    assert cells and all(cell["real_data"]["train_subset"] == subset for cell in cells)
    assert cas["real"]["n_train"] == cas["x1"]["n_train"] == 120
    assert cas["real"]["train_subset"] == subset
    assert "a stratified subset of 120 of its 1077 images" in report
    assert "--train_subset 120 --train_subset_seed 1" in report


def test_every_stage_command_line_rebuilds_its_settings(retinamnist_dir, tmp_path, monkeypatch):
    """Each stage's command line (settings.to_argv, what the report prints) parsed by its script's parser
    gives back the very settings the pipeline ran with: pasting it reruns exactly that stage.

    (A run on RetinaMNIST once reached the generation stage and died there: the
    generator was handed --data_dir, which it did not take.)
    """
    import importlib

    sys.path.insert(0, str(REPO))
    from Pipeline.stages import BUDGETS, Pipeline, budget_with
    from Utils.runtime import RuntimeSettings

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    pipeline = Pipeline("retinamnist", "tiny", budget_with(BUDGETS["quick"], max_multiple=2),
                        data_dir=retinamnist_dir, exp="0001",
                        storage=f"sqlite:///{tmp_path / 'study.db'}", runtime=RuntimeSettings(xla=True),
                        quality=True)
    winners = {"enc": {"enc_epoch": 3, "inf_steps": 10, "ugs": 2.0},
               "dif": {"dif_epoch": 2, "inf_steps": 12, "ugs": 3.5}}
    monkeypatch.setattr(pipeline, "winner", winners.__getitem__)
    stages = pipeline.stages()
    assert [s.name for s in stages][-4:] == ["cas_real", "cas_x1", "cas_x2", "quality"]
    for stage in stages:
        settings = stage.settings()
        script = importlib.import_module(Path(stage.script).stem)
        argv = settings.to_argv()
        try:
            parsed = type(settings).from_namespace(script.parser.parse_args(argv))
        except SystemExit:
            pytest.fail(f"{stage.script} rejects the {stage.name} stage's flags: {' '.join(argv)}")
        assert parsed == settings, (stage.name, argv)
        assert settings.command(stage.script).startswith(f"python {stage.script} ")
        assert ("--exp" in argv and argv[argv.index("--exp") + 1] == "0001"), (stage.name, argv)
    # The stages that train classifiers share the pipeline's compiled one (Models.classifier.ClassifierPool);
    # the quality stage's feature extractor is kept, so it trains its own.
    import inspect

    pooled = [s.name for s in stages if s.trains_classifiers]
    assert pooled == ["tune_enc", "enc_default", "tune_dif", "dif_default", "cas_real", "cas_x1", "cas_x2"]
    assert all("classifier_pool" in inspect.signature(s.module.run).parameters for s in stages if s.trains_classifiers)
    by_name = {s.name: s.settings() for s in stages}
    assert by_name["generate"].img_total == 2 * 1080 and by_name["generate"].data_dir is None
    assert by_name["generate"].batch_size == BUDGETS["quick"].generation_batch_size
    assert by_name["cas_real"].synthetic is False and by_name["cas_x2"].take == 2
    assert by_name["tune_dif"].enc_epoch == 3 and by_name["dif"].enc_epoch == 3
    assert by_name["tune_enc"].batch_size == BUDGETS["quick"].classifier_batch_size
    assert by_name["tune_enc"].multi_gpu is False and by_name["enc"].xla is True
