"""Which process runs a trial, whether it still lives, and failing the trials of dead ones.

A trial that raises is marked FAIL by Optuna and not counted; a trial left
RUNNING by a killed process is marked FAIL by the next worker that looks
(`fail_dead_trials`), immediately when its process (the "worker" user
attribute, host:pid:start-ticks) is known dead on this machine, else once its
heartbeat (the "heartbeat" user attribute, refreshed every
HEARTBEAT_INTERVAL_S on every storage, the journal file included) is older
than GRACE_PERIOD_S. The environment (SDDG_HEARTBEAT_INTERVAL_S,
SDDG_GRACE_PERIOD_S) overrides both for clusters whose workers may stall
longer, and for tests that cannot wait minutes. SDDG_WORKER_HOST names the
machine a worker records (default: the hostname): set it where containers on
different machines share one hostname, or a worker would take another
machine's live process for a dead one of its own.

Example:
    >>> with trial_heartbeat(trial):
    ...     value = objective(trial)
    >>> fail_dead_trials(study)          # [3]: trial 3's worker was killed
"""

import contextlib
import os
import socket
import threading
import time
import warnings

import optuna

# A running trial's worker writes a heartbeat every HEARTBEAT_INTERVAL_S; one silent for
# GRACE_PERIOD_S is failed by the next worker that looks.
HEARTBEAT_INTERVAL_S = int(os.environ.get("SDDG_HEARTBEAT_INTERVAL_S", 30))
GRACE_PERIOD_S = int(os.environ.get("SDDG_GRACE_PERIOD_S", 120))


def process_start_ticks(pid):
    """Start time of process `pid` in clock ticks since boot (Linux), else ''. Guards against PID reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def machine_name():
    """The machine this worker records: $SDDG_WORKER_HOST, else the hostname."""
    return os.environ.get("SDDG_WORKER_HOST") or socket.gethostname()


def worker_id():
    """host:pid:start-ticks of this process, stored on each trial it runs."""
    return f"{machine_name()}:{os.getpid()}:{process_start_ticks(os.getpid())}"


def _worker_alive(worker):
    """True/False for a worker on this host; None when it ran elsewhere (only the heartbeat knows)."""
    try:
        host, pid, ticks = worker.rsplit(":", 2)
        pid = int(pid)
    except (ValueError, AttributeError):
        return None
    if host != machine_name():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return process_start_ticks(pid) == ticks


def worker_dead(trial, now=None):
    """True when the RUNNING trial's worker is known to be gone.

    A worker on this host is checked directly (its process is gone). One elsewhere
    is dead when its heartbeat (`trial_heartbeat`), or the trial's start when it
    never beat, is older than GRACE_PERIOD_S: this works on every storage, the
    journal file included, which has no heartbeat of its own.
    """
    worker = trial.user_attrs.get("worker")
    alive = _worker_alive(worker) if worker is not None else None
    if alive is not None:
        return not alive
    last = trial.user_attrs.get("heartbeat")
    if last is None:
        last = trial.datetime_start.timestamp() if trial.datetime_start is not None else None
    now = time.time() if now is None else now
    return last is not None and now - float(last) > GRACE_PERIOD_S


@contextlib.contextmanager
def trial_heartbeat(trial, interval_s=None):
    """Claims `trial` for this process and refreshes its "heartbeat" attribute while the block runs.

    Other workers read both in `fail_dead_trials`: the claim tells a local worker's
    death at once, the heartbeat a remote one's after GRACE_PERIOD_S.
    """
    interval_s = HEARTBEAT_INTERVAL_S if interval_s is None else interval_s
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("heartbeat", time.time())
    stop = threading.Event()

    def beat():
        while not stop.wait(interval_s):
            try:
                trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial finished meanwhile, or the storage blinked: the next beat retries
                pass

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_dead_trials(study):
    """Marks FAIL the RUNNING trials of dead workers (`worker_dead`); returns their numbers."""
    from optuna.trial import TrialState

    running = (TrialState.RUNNING,)
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if isinstance(study._storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)  # Optuna's own heartbeat (RDB storages)
    for trial in study.get_trials(deepcopy=False, states=running):
        if worker_dead(trial):
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                failed.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker finished or failed it meanwhile
    return failed
