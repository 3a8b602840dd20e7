"""What a study found: its winner (the one-standard-error rule) and the stage table.

The stage table, CAS Results/pipeline_optimization_exp{exp}.json, has the
layout of published_cas.json's "pipeline" section:

    {dataset: {after_class_encoder|after_unet_finetune: {no_opt|opt|opt_kid: cell}}}

A cell holds the test top-1 / top-5 of a classifier trained on images of the
cell's settings, its validation accuracy, the settings (`inf_steps`, `ugs`,
`enc_epoch` or `dif_epoch`), and the protocol they were scored with
(`PROTOCOL_KEYS`: images per trial, classifier epochs and batch, seed,
preset); an "opt" cell also names its study and trial, the study's trial
counts and search space. `Pipeline/report.py` reads it and the studies.

Example:
    >>> best_trial(study).params                          # {'inf_steps': 19, 'ugs': 2.7, 'enc_epoch': 3}
    >>> winner_settings("0", "digits", "enc")           # the "opt" cell's settings
"""

import math

import numpy as np
import optuna

from Pipeline.tuning.study import completed_trials, count_trials, load_study, tuning_study_name
from Utils.cli import UserError
from Utils.io import merge_json, read_json
from Utils.paths import pipeline_results_json

# The stage table's keys (published_cas.json, "pipeline" section).
STAGE_KEYS = {"enc": "after_class_encoder", "dif": "after_unet_finetune"}
# What makes two cells comparable: the same images per trial, classifier protocol, seed and preset.
PROTOCOL_KEYS = ("num_imgs", "classifier_epochs", "classifier_batch_size", "seed", "preset")
# Study attributes of the one-standard-error rule (`best_trial`).
DEFAULT_SETTINGS_ATTR, VALIDATION_SIZE_ATTR = "default_settings", "validation_size"


def cell_key(optimize=True, objective="cas"):
    """The stage-table cell a run writes: "no_opt", "opt" or "opt_kid"."""
    if not optimize:
        return "no_opt"
    return "opt_kid" if objective == "kid" else "opt"


def best_trial(study):
    """The study's winner: its best COMPLETE trial, or a UserError when there is none.

    One exception, the one-standard-error rule: in a study whose first trial is the
    default settings (`enqueue_defaults`), a trial that beats the default's validation
    accuracy by no more than that accuracy's binomial standard error,
    sqrt(p (1 - p) / n) over the n real validation images, does not displace it: with a
    handful of short trials such a difference is the classifier's noise, not the
    settings' (measured on digits: a 0.019 lead picked a guidance scale that scored
    3 CAS points lower on test). Every reader of the winner goes through here.
    """
    if not completed_trials(study):
        raise UserError(f"study {study.study_name} has no completed trial yet")
    best = study.best_trial
    default = study.user_attrs.get(DEFAULT_SETTINGS_ATTR)
    n = study.user_attrs.get(VALIDATION_SIZE_ATTR)
    if default is None or not n or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        return best
    for trial in completed_trials(study):
        if trial.params == default:
            p = float(trial.value)
            return trial if best.value - p <= math.sqrt(p * (1.0 - p) / n) else best
    return best


def study_winner(storage, dataset, exp, stage, objective="cas"):
    """The best trial (`best_trial`) of an existing study in `storage`, or None when there is none."""
    study = load_study(storage, tuning_study_name(dataset, exp, stage, objective))
    return best_trial(study) if study is not None and completed_trials(study) else None


def reusable_default_trial(storage, name, settings, protocol):
    """A COMPLETE trial of study `name` with exactly `settings` and the same protocol, or None.

    Its numbers are what scoring those settings again would give (same seed, images and
    classifier protocol), so the no-opt row takes them instead of recomputing them.
    """
    if storage is None:
        return None
    study = load_study(storage, name)
    if study is None:
        return None
    stored = study.user_attrs.get("protocol", {})
    if any(stored.get(k) != v for k, v in protocol.items()):
        return None
    for trial in completed_trials(study):
        # Settings the study did not search (a fixed sampler or spacing) are in the protocol matched above.
        searched = {key: settings.get(key) for key in trial.params}
        if as_builtin(trial.params) == as_builtin(searched) and "test_top1" in trial.user_attrs:
            return study, trial
    return None


def as_builtin(settings):
    """Settings with NumPy scalars turned into Python numbers (for JSON and command lines)."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating,)):
            value = float(value)
        if isinstance(value, float) and math.isfinite(value):
            value = round(value, 6)
        out[key] = value
    return out


def record_pipeline(exp, dataset, stage, key, entry):
    """Merges one cell of the stage table into CAS Results/pipeline_optimization_exp{exp}.json.

    Layout as published_cas.json's "pipeline" section:
    {dataset: {after_class_encoder|after_unet_finetune: {no_opt|opt|opt_kid: {top1, top5, ...}}}}
    """
    return merge_json(pipeline_results_json(exp), {dataset: {STAGE_KEYS[stage]: {key: entry}}})


def trial_entry(study, trial, objective_name, space):
    """The stage-table cell of a study's winner."""
    entry = {
        "top1": trial.user_attrs.get("test_top1"),
        "top5": trial.user_attrs.get("test_top5"),
        "val_accuracy": trial.user_attrs.get("val_accuracy"),
        "settings": dict(trial.params),
        "objective": objective_name,
        "study": study.study_name,
        "trial": trial.number,
        "trials": count_trials(study),
        "search_space": space.to_dict(),
    }
    if objective_name == "kid":
        entry["kid"] = trial.value
    return entry


def read_cell(exp, dataset, stage, key):
    """One cell of the stage table, or None."""
    table = read_json(pipeline_results_json(exp), default={}) or {}
    return table.get(dataset, {}).get(STAGE_KEYS[stage], {}).get(key)


def cell_matches(cell, protocol, n_trials=None):
    """True when `cell` was scored with `protocol` (and, given n_trials, from that many finished trials)."""
    if not cell or any(cell.get(k) != v for k, v in protocol.items()):
        return False
    if n_trials is not None:
        trials = cell.get("trials", {})
        if trials.get("COMPLETE", 0) + trials.get("PRUNED", 0) < n_trials:
            return False
    return True


def winner_settings(exp, dataset, stage, objective="cas"):
    """The settings of study `stage`'s winner, from the stage table's "opt" (or "opt_kid") cell.

    {"inf_steps": ..., "ugs": ..., "enc_epoch" | "dif_epoch": ...}; a UserError when the
    stage has not been tuned yet.
    """
    key = cell_key(True, objective)
    cell = read_cell(exp, dataset, stage, key)
    if not cell:
        raise UserError(f"no tuned settings for {stage} of {dataset} in {pipeline_results_json(exp)}; "
                        f"run hyp_opt.py --dataset {dataset} --train_model {stage} --exp {exp} first")
    return dict(cell["settings"])
