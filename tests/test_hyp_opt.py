"""hyp_opt.py, Pipeline/tune.py and Pipeline/tuning/: search space, storage, resume, pruning, no test-label leak.

The slowest tests train the `tiny` diffusion model on digits for two epochs
once (module fixture) and run real trials on it with tiny budgets (a few dozen
images, one classifier epoch).
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from Pipeline import tune, tuning
from Utils.cli import UserError

REPO = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ no TensorFlow needed ----

def test_search_space_is_the_papers_over_existing_checkpoints():
    enc = tuning.build_search_space("enc", range(1, 51))
    assert (enc.steps, enc.ugs, enc.checkpoint_epochs) == ((5, 50), (0.0, 7.5), tuple(range(1, 51)))
    dif = tuning.build_search_space("dif", range(1, 11), is_1=30, ugs_1=2.5)
    assert (dif.steps, dif.ugs, dif.checkpoint_param) == ((5, 30), (0.0, 5.0), "dif_epoch")
    # A short run: only the checkpoints that exist; a CPU budget caps the steps.
    short = tuning.build_search_space("enc", [3, 1, 2], max_steps=25)
    assert short.steps == (5, 25) and short.checkpoint_epochs == (1, 2, 3)
    assert tuning.build_search_space("dif", [1], is_1=4, ugs_1=1.0).steps == (4, 4)
    with pytest.raises(UserError, match="is_1"):
        tuning.build_search_space("dif", [1, 2])
    with pytest.raises(UserError, match="no enc checkpoints"):
        tuning.build_search_space("enc", [])


@pytest.mark.parametrize("epochs", [[2, 4, 6], [1, 2, 7]])
def test_only_existing_checkpoints_are_offered(epochs):
    space = tuning.build_search_space("enc", epochs)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    study.optimize(lambda t: space.suggest(t)["enc_epoch"] + space.suggest(t)["ugs"], n_trials=20)
    drawn = {t.params["enc_epoch"] for t in study.trials}
    assert drawn <= set(epochs) and len(drawn) > 1
    assert all(5 <= t.params["inf_steps"] <= 50 and 0 <= t.params["ugs"] <= 7.5 for t in study.trials)


def test_trial_labels_are_balanced_and_cover_every_class():
    labels = tuning.trial_labels(23, 5)
    assert np.bincount(labels).tolist() == [5, 5, 5, 4, 4]
    with pytest.raises(UserError):
        tuning.trial_labels(3, 5)


def _quiet_env(tmp_path):
    return dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("args, message", [
    (["--train_model", "enc", "--storage", "foo://nowhere"], "cannot open the Optuna storage foo://nowhere"),
    (["--train_model", "enc", "--storage", "sqlite:////no/such/folder/x.db"], "folder /no/such/folder does not exist"),
    (["--train_model", "enc", "--storage", "postgresql://me:secret@localhost/optuna"], "postgresql://me:***@"),
    (["--train_model", "enc", "--storage", "not a url"], "is not a storage URL"),
    (["--train_model", "gan"], "argument --train_model: invalid choice"),
    (["--train_model", "enc", "--n_trials", "0"], "--n_trials: expected a positive integer"),
    (["--train_model", "enc", "--objective", "fid"], "--objective: invalid choice"),
    (["--train_model", "enc", "--enc_epoch", "3"], "are for --train_model dif"),
    (["--train_model", "enc", "--num_imgs", "5"], "fewer than digits's 10 classes"),
    (["--train_model", "enc", "--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
])
def test_bad_flags_and_storage_are_one_line_and_exit_2(tmp_path, args, message):
    argv = ["--dataset", "digits", *args] if "--dataset" not in args else args
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "hyp_opt.py"), *argv], cwd=tmp_path,
                          env=_quiet_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "secret" not in done.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"
    assert time.perf_counter() - started < 30  # fails before TensorFlow starts


def test_study_refuses_other_settings_and_direction(tmp_path):
    storage = tuning.open_storage(f"sqlite:///{tmp_path}/s.db")
    tuning.open_study(storage, "d_exp0_study_enc", "maximize", 0, 3, {"num_imgs": 40})
    tuning.open_study(storage, "d_exp0_study_enc", "maximize", 0, 3, {"num_imgs": 40})  # resumes
    with pytest.raises(UserError, match="num_imgs=40 \\(now 80\\)"):
        tuning.open_study(storage, "d_exp0_study_enc", "maximize", 0, 3, {"num_imgs": 80})
    with pytest.raises(UserError, match="minimize"):
        tuning.open_study(storage, "d_exp0_study_enc", "minimize", 0, 3, {"num_imgs": 40})


def test_trials_of_a_dead_process_are_failed_on_resume_and_not_counted(tmp_path):
    import threading

    storage = tuning.open_storage(f"journal:{tmp_path}/study.log")
    study = tuning.open_study(storage, "s", "maximize", 0, None, {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = study.ask()  # a trial its (killed) worker never finished
    ghost.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}:1")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    alive = study.ask()  # a live worker's trial on this machine: holds a slot while it lives
    alive.set_user_attr("worker", f"{socket.gethostname()}:{other.pid}:{tuning.process_start_ticks(other.pid)}")
    space = tuning.build_search_space("enc", [1, 2])
    messages = []
    worker = threading.Thread(target=tuning.run_study, kwargs=dict(
        study=study, objective=lambda t: float(space.suggest(t)["enc_epoch"]), n_trials=3,
        log=messages.append, poll_s=0.05))
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while len(study.get_trials(states=tuning.TRIAL_STATES_COUNTED)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # 3 wanted = 2 complete + the live worker's running trial: this worker waits for it.
        assert worker.is_alive() and [t.state.name for t in study.trials] == ["FAIL", "RUNNING", "COMPLETE", "COMPLETE"]
    finally:
        other.kill()
        other.wait()
    worker.join(60)
    assert not worker.is_alive()
    # Its worker died: the slot is freed and the target reached by one more trial.
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert any("trial(s) 0 left running by a killed process" in m for m in messages)
    assert any("trial(s) 1 left running by a killed process" in m for m in messages)


def test_a_trial_its_worker_never_claimed_is_failed_after_the_grace_period(tmp_path, monkeypatch):
    """Killed between Optuna creating the trial and the objective storing its worker id."""
    study = tuning.open_study(tuning.open_storage(f"journal:{tmp_path}/study.log"), "s", "maximize", 0, None, {})
    unclaimed = study.ask()
    assert tuning.fail_dead_trials(study) == []  # just started: its worker may still claim it
    assert study.trials[unclaimed.number].state.name == "RUNNING"
    monkeypatch.setattr(time, "time", lambda: 2 * tuning.GRACE_PERIOD_S + 1e10)
    assert tuning.fail_dead_trials(study) == [unclaimed.number]
    assert study.trials[unclaimed.number].state.name == "FAIL"


def test_failing_trial_is_marked_failed_and_not_counted(tmp_path):
    storage = tuning.open_storage(f"sqlite:///{tmp_path}/s.db")
    study = tuning.open_study(storage, "s", "maximize", 0, None, {})

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise RuntimeError("out of memory, say")
        return 1.0

    tuning.run_study(study, objective, n_trials=1, log=lambda _: None)
    with pytest.raises(RuntimeError):
        tuning.run_study(study, objective, n_trials=2, log=lambda _: None)
    tuning.run_study(study, objective, n_trials=2, log=lambda _: None)  # the rerun finishes the job
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]


# ------------------------------------------------------------------ real classifier training ----

class _DigitsSource:
    """An image source for pruning tests: real digits for a high UGS, uniform noise otherwise.

    It stands in for the generator only; the objective, the classifier training,
    the Optuna pruner and the storage are the real ones.
    """

    def __init__(self, splits):
        self.splits = splits

    def __call__(self, settings, labels, seed):
        if settings["ugs"] < 3.75:
            return np.random.default_rng(seed).integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
        x, y = self.splits.x_train, self.splits.y_train  # labels are sorted: class blocks in order
        return np.concatenate([x[y == c][: int(np.sum(labels == c))] for c in range(10)])


def test_hyperband_prunes_a_trial_that_falls_behind(tmp_path):
    from Data.loaders import load_dataset
    from Models.classifier import ClassifierConfig, ClassifierPool

    splits = load_dataset("digits")
    space = tuning.build_search_space("enc", [1], max_steps=5)
    # The trials train one compiled classifier in turn, as in hyp_opt.py.
    objective = tuning.GenerationObjective(_DigitsSource(splits), space, splits, num_imgs=500,
                                           classifier_config=ClassifierConfig(epochs=2, batch_size=32),
                                           classifier_pool=ClassifierPool())
    storage = tuning.open_storage(f"sqlite:///{tmp_path}/s.db")
    # max_resource 2 epochs: Hyperband has a single bracket, so trial 1 is judged against trial 0.
    study = tuning.open_study(storage, "prune", "maximize", 0, max_resource=2, protocol={})
    study.enqueue_trial({"inf_steps": 5, "ugs": 7.0, "enc_epoch": 1})   # real digits
    study.enqueue_trial({"inf_steps": 5, "ugs": 0.5, "enc_epoch": 1})   # noise
    tuning.run_study(study, objective, n_trials=2, log=lambda _: None)
    good, bad = study.trials
    assert good.state.name == "COMPLETE" and good.value > 0.5
    assert sorted(good.intermediate_values) == [1, 2]  # every epoch reported
    assert {"test_top1", "test_top5", "val_accuracy"} <= set(good.user_attrs)
    assert bad.state.name == "PRUNED" and list(bad.intermediate_values) == [1]
    assert "test_top1" not in bad.user_attrs


# ------------------------------------------------------------------ real tiny diffusion checkpoints ----

def _trial_states(db):
    with sqlite3.connect(db) as connection:
        return [state for _, state in connection.execute("select number, state from trials order by number")]


def _claimed_running_trials(db):
    """RUNNING trials whose worker has stored its id (the objective has started)."""
    with sqlite3.connect(db) as connection:
        return connection.execute("select count(*) from trials t join trial_user_attributes a "
                                  "on a.trial_id = t.trial_id where t.state = 'RUNNING' and a.key = 'worker'"
                                  ).fetchone()[0]


TINY_TUNING = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--num_imgs", "20",
               "--classifier_epochs", "1", "--batch_size", "32", "--max_steps", "5"]


def test_study_resumes_to_the_total_and_a_killed_trial_is_failed(tiny_checkpoints, monkeypatch):
    root = tiny_checkpoints
    db = root / "Experiments" / "Exp_0" / "digits" / "optuna.db"
    command = [sys.executable, str(REPO / "hyp_opt.py"), *TINY_TUNING]

    def run(n_trials, *extra):
        done = subprocess.run([*command, "--n_trials", str(n_trials), *extra], cwd=root, env=_quiet_env(root),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    out = run(2, "--enqueue_defaults")
    assert len(_trial_states(db)) == 2 and set(_trial_states(db)) <= {"COMPLETE", "PRUNED"}
    # The first trial is the default settings: last checkpoint, the preset's UGS, steps clipped to --max_steps.
    from Models.diffusion.presets import get_preset

    defaults = {"inf_steps": 5, "ugs": float(get_preset("tiny").default_guidance_scale), "enc_epoch": 2}
    assert f"first trial: the default settings {defaults}" in out

    # Rerun asking for 3 in total, killed (SIGKILL) in the middle of its one new trial.
    worker = subprocess.Popen([*command, "--n_trials", "3"], cwd=root, env=_quiet_env(root),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _claimed_running_trials(db) and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.5)
    assert worker.poll() is None, "the worker finished before it could be killed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert _trial_states(db)[2] == "RUNNING"

    out = run(3, "--save_plots")
    states = _trial_states(db)
    assert "marked as failed the trial(s) 2 left running by a killed process" in out
    assert states[2] == "FAIL" and len(states) == 4
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3  # one more, not three more
    table = json.loads((root / "CAS Results" / "pipeline_optimization_exp0.json").read_text())
    cell = table["digits"]["after_class_encoder"]["opt"]
    assert cell["trials"]["FAIL"] == 1 and cell["settings"]["enc_epoch"] in (1, 2)
    assert 0 <= cell["top1"] <= 1 and 0 <= cell["val_accuracy"] <= 1 and cell["num_imgs"] == 20
    plots = root / "optimization_plots" / "Exp_0" / "digits" / "enc"
    assert (plots / "history.png").stat().st_size > 1000 and (plots / "timeline.png").exists()

    # Done for these settings (3 finished trials in the study and the cell, the same protocol); not for others.
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(root))
    same = tune.TuneSettings.from_argv([*TINY_TUNING, "--n_trials", "3"])
    assert "3 finished trials" in tune.is_done(same)
    for other in (dict(n_trials=4), dict(num_imgs=40), dict(batch_size=64), dict(classifier_epochs=2),
                  dict(seed=1), dict(optimize=False), dict(objective="kid")):
        assert tune.is_done(same.replace(**other)) is None, other
    assert tune.winner_settings("0", "digits", "enc") == cell["settings"]


class _TestSplitRead(Exception):
    pass


class _Poisoned:
    """A test split that raises on any read."""

    def __array__(self, *args, **kwargs):
        raise _TestSplitRead("the test split was read")

    def __len__(self):
        raise _TestSplitRead("the test split was read")

    def __getitem__(self, item):
        raise _TestSplitRead("the test split was read")


def test_objective_never_reads_test_labels(tiny_checkpoints, monkeypatch):
    import dataclasses

    import tensorflow as tf

    from Data.loaders import load_dataset
    from Models.classifier import ClassifierConfig, ClassifierPool

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    tf.config.experimental.enable_op_determinism()
    splits = load_dataset("digits")
    source = tuning.DiffusionImageSource(0, "digits", "tiny", "enc")
    space = tuning.build_search_space("enc", source.checkpoint_epochs(), max_steps=5)
    params = {"inf_steps": 5, "ugs": 2.0, "enc_epoch": 2}
    # One compiled classifier for every score, as in hyp_opt.py: the first score trains a fresh model, the
    # others the pooled one, so the equalities below also hold the pool to a fresh model's weights.
    pool = ClassifierPool()

    def score(test_split):
        objective = tuning.GenerationObjective(source, space, test_split, num_imgs=40,
                                               classifier_config=ClassifierConfig(epochs=2, batch_size=32),
                                               classifier_pool=pool)
        trial = optuna.trial.FixedTrial(params)
        return objective(trial), trial

    value, trial = score(splits)
    assert 0 <= trial.user_attrs["test_top1"] <= 1
    # Other test labels and images: the objective value does not move by one bit.
    rng = np.random.default_rng(1)
    wrong = dataclasses.replace(splits, y_test=(splits.y_test + 1) % 10,
                                x_test=rng.integers(0, 256, splits.x_test.shape, dtype=np.uint8))
    assert score(wrong)[0] == value
    # A test split that raises when read: the value was fixed before the first read.
    poisoned = dataclasses.replace(splits, x_test=_Poisoned(), y_test=_Poisoned())
    objective = tuning.GenerationObjective(source, space, poisoned, num_imgs=40,
                                           classifier_config=ClassifierConfig(epochs=2, batch_size=32),
                                           classifier_pool=pool)
    trial = optuna.trial.FixedTrial(params)
    with pytest.raises(_TestSplitRead):
        objective(trial)
    assert trial.user_attrs["val_accuracy"] == value and "test_top1" not in trial.user_attrs


def test_kid_objective_tunes_without_classifiers_and_records_its_winners_cas(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    settings = tune.TuneSettings(dataset="digits", train_model="enc", exp="0", preset="tiny", n_trials=2,
                                 num_imgs=40, classifier_epochs=1, batch_size=32, max_steps=5, objective="kid")
    result = tune.run(settings, log=lambda _: None)
    storage = tuning.open_storage(tuning.default_storage_url(0, "digits"))
    study = optuna.load_study(study_name="digits_exp0_study_enc_kid", storage=storage)
    assert study.direction.name == "MINIMIZE" and len(tuning.completed_trials(study)) == 2
    for trial in study.trials:  # no classifier per trial: no epochs reported, no accuracy
        assert not trial.intermediate_values and "test_top1" not in trial.user_attrs
        assert trial.user_attrs["kid"] == trial.value
    assert result.kid == study.best_value and result.settings == tuning.as_builtin(study.best_params)
    assert result.key == "opt_kid" and result.entry["kid"] == result.kid and result.trials == {"COMPLETE": 2}
    table = json.loads((tiny_checkpoints / "CAS Results" / "pipeline_optimization_exp0.json").read_text())
    cell = table["digits"]["after_class_encoder"]["opt_kid"]
    assert cell["objective"] == "kid" and 0 <= cell["top1"] <= 1 and 0 <= cell["val_accuracy"] <= 1


def test_no_optimize_scores_the_default_settings_and_is_then_done(tiny_checkpoints, monkeypatch):
    from Models.diffusion.presets import get_preset

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    settings = tune.TuneSettings(dataset="digits", preset="tiny", exp="0", optimize=False, num_imgs=20,
                                 classifier_epochs=1, batch_size=32, seed=3)
    assert tune.is_done(settings) is None
    result = tune.run(settings, log=lambda _: None)
    tiny = get_preset("tiny")
    assert result.key == "no_opt" and result.settings == {"inf_steps": tiny.default_inference_steps,
                                                          "ugs": float(tiny.default_guidance_scale), "enc_epoch": 2}
    assert 0 <= result.top1 <= 1 and 0 <= result.val_accuracy <= 1
    table = json.loads((tiny_checkpoints / "CAS Results" / "pipeline_optimization_exp0.json").read_text())
    cell = table["digits"]["after_class_encoder"]["no_opt"]
    assert cell == result.entry and cell["classifier_batch_size"] == 32 and cell["seed"] == 3
    assert tune.is_done(settings) == "after_class_encoder.no_opt recorded"
    assert tune.is_done(settings.replace(batch_size=64)) is None


def test_the_default_settings_stay_the_winner_unless_beaten_by_more_than_one_standard_error():
    from Pipeline.tuning import DEFAULT_SETTINGS_ATTR, VALIDATION_SIZE_ATTR, best_trial

    default = {"inf_steps": 20, "ugs": 1.5, "enc_epoch": 30}

    def study_with(values, direction="maximize", marked=True):
        study = optuna.create_study(direction=direction, storage="sqlite:///:memory:", study_name="s")
        for i, value in enumerate(values):
            params = default if i == 0 else {"inf_steps": 20, "ugs": 1.0 + i / 10, "enc_epoch": 30}
            dists = {"inf_steps": optuna.distributions.IntDistribution(5, 20),
                     "ugs": optuna.distributions.FloatDistribution(0, 7.5),
                     "enc_epoch": optuna.distributions.IntDistribution(1, 30)}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
        if marked:
            study.set_user_attr(DEFAULT_SETTINGS_ATTR, default)
            study.set_user_attr(VALIDATION_SIZE_ATTR, 360)
        return study

    # sqrt(0.7389 * 0.2611 / 360) = 0.0231: a lead of 0.0194 is noise, one of 0.0300 is not.
    assert best_trial(study_with([0.7389, 0.7583, 0.70])).params == default
    assert best_trial(study_with([0.7389, 0.7689, 0.70])).params["ugs"] == pytest.approx(1.1)
    # Without the default marked (no --enqueue_defaults), or minimising (KID), the plain best.
    assert best_trial(study_with([0.7389, 0.7583], marked=False)).params["ugs"] == pytest.approx(1.1)
    assert best_trial(study_with([0.5, 0.4], direction="minimize")).params["ugs"] == pytest.approx(1.1)
    # The default itself the best: it wins.
    assert best_trial(study_with([0.80, 0.79])).params == default
