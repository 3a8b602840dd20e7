"""Bayesian optimisation of the generation settings (PAPER.md, stages 2 and 4): the machinery.

The stage itself (settings, `is_done`, `run`) is `Pipeline/tune.py`, with
`hyp_opt.py` its command line. This package holds one file per concern:

| file | what |
| --- | --- |
| `space.py` | the paper's search space (steps, UGS, checkpoint epoch) over the checkpoints that exist; the default (no-optimisation) settings |
| `images.py` | a trial's balanced labels and its images, generated in memory from a checkpoint |
| `objective.py` | the Optuna objective: validation accuracy of a ResNet20 trained on the trial's images (test recorded, never optimised), or KID; the pruning callback |
| `storage.py` | opening a storage: SQLite (default), PostgreSQL / MySQL, a journal file; one-line errors |
| `workers.py` | which process runs a trial, its heartbeat, failing the trials of killed workers |
| `study.py` | creating / resuming a study (protocol and direction checked), the TPE sampler, the trial loop that stops several workers at exactly `n_trials` |
| `results.py` | the winner (`best_trial`, the one-standard-error rule) and the stage table JSON |
| `plots.py` | the paper's Optuna plots as PNG |

What a trial does: it picks an inference-step count, an unconditional
guidance scale (UGS) and a checkpoint epoch of the stage being tuned,
generates `num_imgs` images balanced over the classes, trains a ResNet20 on
them and returns the best VALIDATION accuracy on the real validation split;
Hyperband prunes trials that fall behind. Every trial uses the same seeds
(common random numbers). Details in each file's docstring.

Example:
    >>> space = build_search_space("enc", checkpoint_epochs=[1, 2, 3], max_steps=25)
    >>> source = DiffusionImageSource(exp="0", dataset="digits", preset="tiny", stage="enc")
    >>> objective = GenerationObjective(source, space, load_dataset("digits"), num_imgs=500,
    ...                                 classifier_config=ClassifierConfig(epochs=5))
    >>> study = open_study(open_storage(default_storage_url("0", "digits")),
    ...                    tuning_study_name("digits", "0", "enc"), "maximize", seed=0, max_resource=5,
    ...                    protocol={"num_imgs": 500})
    >>> run_study(study, objective, n_trials=10)
    >>> best_trial(study).params        # {'inf_steps': 19, 'ugs': 2.7, 'enc_epoch': 3}
"""

from Pipeline.tuning.space import (CHECKPOINT_PARAM, PAPER_CHECKPOINTS, PAPER_STEPS, PAPER_UGS_MAX, STAGES,
                                   STEPS_PARAM, UGS_PARAM, SearchSpace, build_search_space, default_settings)
from Pipeline.tuning.images import GENERATION_BATCH_SIZE, DiffusionImageSource, trial_labels
from Pipeline.tuning.objective import OBJECTIVES, GenerationObjective, OptunaPruning
from Pipeline.tuning.workers import (GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, fail_dead_trials, process_start_ticks,
                                     trial_heartbeat, worker_dead, worker_id)
from Pipeline.tuning.storage import (CONNECT_TIMEOUT_S, STORAGE_FILE, default_storage_path, default_storage_url,
                                     open_storage, redact)
from Pipeline.tuning.study import (TRIAL_STATES_COUNTED, SurplusTrial, completed_trials, count_trials,
                                   describe_trial, load_study, open_study, run_study, trial_sampler,
                                   tuning_study_name)
from Pipeline.tuning.results import (DEFAULT_SETTINGS_ATTR, PROTOCOL_KEYS, STAGE_KEYS, VALIDATION_SIZE_ATTR,
                                     as_builtin, best_trial, cell_key, cell_matches, read_cell, record_pipeline,
                                     reusable_default_trial, study_winner, trial_entry, winner_settings)
from Pipeline.tuning.plots import plots_dir, save_study_plots

__all__ = [
    "CHECKPOINT_PARAM", "PAPER_CHECKPOINTS", "PAPER_STEPS", "PAPER_UGS_MAX", "STAGES", "STEPS_PARAM", "UGS_PARAM",
    "SearchSpace", "build_search_space", "default_settings",
    "GENERATION_BATCH_SIZE", "DiffusionImageSource", "trial_labels",
    "OBJECTIVES", "GenerationObjective", "OptunaPruning",
    "GRACE_PERIOD_S", "HEARTBEAT_INTERVAL_S", "fail_dead_trials", "process_start_ticks", "trial_heartbeat",
    "worker_dead", "worker_id",
    "CONNECT_TIMEOUT_S", "STORAGE_FILE", "default_storage_path", "default_storage_url", "open_storage", "redact",
    "TRIAL_STATES_COUNTED", "SurplusTrial", "completed_trials", "count_trials", "describe_trial", "load_study",
    "open_study", "run_study", "trial_sampler", "tuning_study_name",
    "DEFAULT_SETTINGS_ATTR", "PROTOCOL_KEYS", "STAGE_KEYS", "VALIDATION_SIZE_ATTR", "as_builtin", "best_trial",
    "cell_key", "cell_matches", "read_cell", "record_pipeline", "reusable_default_trial", "study_winner",
    "trial_entry", "winner_settings",
    "plots_dir", "save_study_plots",
]
