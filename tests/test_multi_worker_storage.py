"""Several workers on one study: a real PostgreSQL server and a journal file.

The PostgreSQL server is a throw-away cluster the `postgres_url` fixture starts
(conftest.py); the workers are real hyp_opt.py processes on tiny checkpoints,
with tiny budgets (20 images, one classifier epoch per trial).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from Pipeline import tuning

REPO = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_TUNING = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--num_imgs", "20",
               "--classifier_epochs", "1", "--batch_size", "32", "--max_steps", "5"]
# Seconds: short enough that a test sees a silent worker declared dead.
FAST_HEARTBEAT = {"SDDG_HEARTBEAT_INTERVAL_S": "1", "SDDG_GRACE_PERIOD_S": "20"}


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"journal:{tmp_path}/optuna.log"


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("url, message", [
    ("postgresql://u@127.0.0.1:1/db", "cannot open the Optuna storage postgresql://u@127.0.0.1:1/db"),
    ("journal:", "journal: needs a file"),
    ("journal:{tmp}", "it is not a file"),
    ("journal:{tmp}/no/such/folder/x.log", "does not exist"),
])
def test_bad_or_unreachable_storage_is_one_line_within_seconds(tmp_path, url, message):
    out = tmp_path / "out"
    out.mkdir()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "hyp_opt.py"), *TINY_TUNING,
                           "--storage", url.format(tmp=tmp_path)],
                          cwd=out, env=dict(os.environ, SDDG_OUTPUT_ROOT=str(out)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not any(out.iterdir()), "nothing may be written on bad input"
    assert time.perf_counter() - started < 30


def test_a_remote_workers_trial_lives_by_its_heartbeat(storage_url, monkeypatch):
    """A worker on another machine cannot be asked whether it lives: its heartbeat tells."""
    name = f"heartbeat_{os.getpid()}_{time.time_ns()}"
    study = tuning.open_study(tuning.open_storage(storage_url), name, "maximize", 0, None, {})
    trial = study.ask()
    with tuning.trial_heartbeat(trial, interval_s=0.05):
        first = study.trials[trial.number].user_attrs["heartbeat"]
        time.sleep(0.5)
        assert study.trials[trial.number].user_attrs["heartbeat"] > first  # it beats while the trial runs
    study.tell(trial, 1.0)

    remote = study.ask()
    remote.set_user_attr("worker", "a-machine-elsewhere:4242:99")
    remote.set_user_attr("heartbeat", time.time())
    assert tuning.fail_dead_trials(study) == []  # it beat just now
    monkeypatch.setattr(time, "time", lambda: remote.user_attrs["heartbeat"] + tuning.GRACE_PERIOD_S + 1)
    assert tuning.fail_dead_trials(study) == [remote.number]
    assert study.trials[remote.number].state.name == "FAIL"


def _workers_trial(study, pid):
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("worker", "").split(":")[1:2] == [str(pid)]:
            return trial
    return None


WINNER = re.compile(r"best of \d+ trial\(s\) .*: trial (\d+) (\{.*?\}) ->")


def test_three_workers_one_killed_reach_exactly_the_target(tiny_checkpoints, storage_url):
    """Three workers as on three machines (each names its own, SDDG_WORKER_HOST): none can look
    up another's process, so the killed worker's trial is failed by its silent heartbeat."""
    root, n_trials = tiny_checkpoints, 4
    name = tuning.tuning_study_name("digits", 0, "enc")
    command = [sys.executable, str(REPO / "hyp_opt.py"), *TINY_TUNING, "--storage", storage_url,
               "--n_trials", str(n_trials)]
    logs = [root / f"worker_{i}_{storage_url.split(':')[0]}.log" for i in range(3)]
    workers = [subprocess.Popen(command, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                env=dict(os.environ, SDDG_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1",
                                         SDDG_WORKER_HOST=f"machine-{i}", **FAST_HEARTBEAT))
               for i, log in enumerate(logs)]
    try:
        storage = tuning.open_storage(storage_url)
        victim, killed_trial = workers[0], None
        deadline = time.monotonic() + 400
        while killed_trial is None and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.3)
            try:
                killed_trial = _workers_trial(optuna.load_study(study_name=name, storage=storage), victim.pid)
            except KeyError:
                pass  # the study is not created yet
        assert killed_trial is not None, "worker 0 never started a trial: " + logs[0].read_text()[-3000:]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for worker, log in zip(workers[1:], logs[1:]):
            assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    study = optuna.load_study(study_name=name, storage=tuning.open_storage(storage_url))
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed_trial.number] == "FAIL"
    # Failed by the heartbeat: not before the grace period after its last beat.
    failed = study.trials[killed_trial.number]
    silent_for = failed.datetime_complete.timestamp() - failed.user_attrs["heartbeat"]
    assert silent_for >= int(FAST_HEARTBEAT["SDDG_GRACE_PERIOD_S"]) - 1, silent_for
    assert sum(s in ("COMPLETE", "PRUNED") for s in states.values()) == n_trials, states
    assert "RUNNING" not in states.values()
    # Every surviving worker waited for the whole study and read the same winner.
    winners = {WINNER.search(log.read_text()).groups() for log in logs[1:]}
    best = tuning.best_trial(study)
    assert winners == {(str(best.number), str(tuning.as_builtin(best.params)))}, winners
