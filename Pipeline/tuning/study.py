"""A study and its trial loop: create or resume, run until exactly `n_trials` finished trials.

A study's name is the paper's `{dataset}_exp{exp}_study_{enc|dif}` (a `_kid`
suffix for the KID objective: `tuning_study_name`). `n_trials` is the TOTAL
number of finished (complete or pruned) trials wanted: rerunning a 2-trial
study with `n_trials=3` runs one more, and any number of workers on one
storage together stop at exactly `n_trials` (`run_study`; dead workers'
trials: `Pipeline.tuning.workers`). The protocol settings (preset, images per
trial, classifier epochs, ...) are stored in the study; resuming with other
settings is an error instead of a study mixing two protocols (`open_study`).

Example:
    >>> study = open_study(open_storage(default_storage_url("0", "digits")),
    ...                    tuning_study_name("digits", "0", "enc"), "maximize", seed=0, max_resource=5,
    ...                    protocol={"num_imgs": 500})
    >>> run_study(study, objective, n_trials=10)
"""

import time

import numpy as np
import optuna
from tqdm.auto import tqdm

from Pipeline.tuning.workers import HEARTBEAT_INTERVAL_S, fail_dead_trials, trial_heartbeat, worker_dead
from Utils.cli import UserError

TRIAL_STATES_COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def tuning_study_name(dataset, exp, stage, objective="cas"):
    """The paper's study name, with a `_kid` suffix for the KID objective."""
    from Utils.paths import study_name

    name = study_name(dataset, exp, stage)
    return f"{name}_kid" if objective == "kid" else name


def load_study(storage, name):
    """The study `name` in `storage`, or None when there is none."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def open_study(storage, name, direction, seed, max_resource, protocol, min_resource=1):
    """Creates or resumes the study `name`; refuses one run with another protocol.

    Args:
        storage: from `open_storage`.
        name: the study name (`Utils.paths.study_name`, `_kid` suffix for KID).
        direction: "maximize" or "minimize".
        seed: the TPE sampler's seed.
        max_resource: the Hyperband pruner's maximum resource (classifier epochs);
            None: no pruning (the KID objective reports no intermediate values).
        min_resource: epochs before a trial can first be pruned (Optuna's default 1;
            short classifier runs are noisy in their first epochs).
        protocol: JSON-able dict of what makes trials comparable (preset, images per
            trial, classifier epochs, seed, ...), stored in the study.
    """

    sampler = trial_sampler(seed, 0)
    pruner = (optuna.pruners.HyperbandPruner(min_resource=min(int(min_resource), int(max_resource)),
                                             max_resource=int(max_resource), reduction_factor=3)
              if max_resource else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"study {name} in this storage maximises/minimises differently "
                        f"({study.direction.name.lower()}, not {direction}); use another --exp or --storage")
    stored = study.user_attrs.get("protocol")
    if stored is None:
        study.set_user_attr("protocol", protocol)
    elif stored != protocol:
        changed = sorted(k for k in set(stored) | set(protocol) if stored.get(k) != protocol.get(k))
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {protocol.get(k)!r})" for k in changed)
        raise UserError(f"study {name} was run with other settings: {shown}; rerun with the same "
                        f"settings to resume it, or use another --exp or --storage")
    return study


def trial_sampler(seed, trial_number):
    """The TPE sampler for trial `trial_number`, seeded by (seed, trial number).

    A fresh seed per trial makes a resumed study draw what an uninterrupted one
    would have (a sampler seeded once per process would repeat its first random
    draws after every restart).
    """

    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([int(seed), int(trial_number)])
                                               .generate_state(1)[0]))

class SurplusTrial(Exception):
    """A trial created after the study already had its target of live trials."""


def _is_surplus(study, trial, n_trials):
    """True when `n_trials` live trials (finished or running, dead ones aside) precede `trial`.

    Workers checking the target and then creating a trial at the same instant create
    one too many; the trial numbers the storage hands out decide which one stands down,
    and every worker reads the same answer.
    """
    from optuna.trial import TrialState

    live = 0
    for other in study.get_trials(deepcopy=False, states=TRIAL_STATES_COUNTED + (TrialState.RUNNING,)):
        if other.number < trial.number and (other.state != TrialState.RUNNING or not worker_dead(other)):
            live += 1
    return live >= n_trials


def count_trials(study):
    """{state name: count} of the study's trials."""
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def describe_trial(trial):
    """One line: number, settings, value, test accuracy or why it stopped."""
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    state = trial.state.name
    if state == "COMPLETE":
        extra = ""
        if "test_top1" in trial.user_attrs:
            extra = f" (test top-1 {trial.user_attrs['test_top1']:.4f}, recorded only)"
        return f"trial {trial.number}: {params} -> {trial.value:.4f}{extra}"
    if state == "PRUNED":
        last = max(trial.intermediate_values) if trial.intermediate_values else 0
        return f"trial {trial.number}: {params} -> pruned after epoch {last}"
    return f"trial {trial.number}: {params} -> {state}"


def run_study(study, objective, n_trials, log=print, seed=None, poll_s=None):
    """Runs trials until the study has exactly `n_trials` finished (complete + pruned) ones.

    Any number of workers, on any machines, may run this on one study at once.
    RUNNING trials of live workers hold a slot of the target: a worker with no
    free slot waits (polling every `poll_s` seconds) until the study reaches its
    target or a slot frees, because a running trial may still fail or its worker
    die. Dead workers' RUNNING trials are failed (`fail_dead_trials`) and free
    their slot. Two workers creating a trial for the last slot at once: the later
    trial number stands down (FAIL, user attribute "surplus"). A trial that
    raises is FAIL (Optuna) and the error propagates: rerun to resume.
    seed: reseed the TPE sampler per trial (`trial_sampler`); None keeps the study's sampler.
    """
    from optuna.trial import TrialState

    poll_s = min(5, HEARTBEAT_INTERVAL_S) if poll_s is None else poll_s

    def fail_dead():
        failed = fail_dead_trials(study)
        if failed:
            log(f"marked as failed the trial(s) {', '.join(map(str, failed))} left running by a killed process")

    def guarded(trial):
        if _is_surplus(study, trial, n_trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study already has {n_trials} finished or running trials")
        with trial_heartbeat(trial):
            return objective(trial)

    def progress():
        fail_dead()
        done = len(study.get_trials(deepcopy=False, states=TRIAL_STATES_COUNTED))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return done, running

    done, running = progress()
    if done:
        log(f"study {study.study_name}: {done} finished trial(s) found, target {n_trials}")
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=f"tuning {study.study_name}", unit="trial")
    try:
        while done < n_trials:
            if done + running >= n_trials:
                time.sleep(poll_s)  # every slot is taken by a running trial: wait for it to end or die
            else:
                trials = study.get_trials(deepcopy=False)
                finished_before = {t.number for t in trials if t.state.is_finished()}
                if seed is not None:
                    study.sampler = trial_sampler(seed, len(trials))
                study.optimize(guarded, n_trials=1, gc_after_trial=True, catch=(SurplusTrial,))
                for trial in study.get_trials(deepcopy=False):
                    if (trial.state.is_finished() and trial.number not in finished_before
                            and not trial.user_attrs.get("surplus")):
                        tqdm.write(describe_trial(trial))
            new_done, running = progress()
            bar.update(max(0, min(new_done, n_trials) - min(done, n_trials)))
            done = new_done
    finally:
        bar.close()
    return study


def completed_trials(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

