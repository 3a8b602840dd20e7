"""Bayesian optimisation of the generation settings (PAPER.md, stages 2 and 4).

What a trial does
-----------------
A trial picks an inference-step count, an unconditional guidance scale (UGS)
and a checkpoint epoch of the stage being tuned (the class encoder for
"enc", the fine-tuned UNet for "dif"), generates `num_imgs` images balanced
over the classes with that checkpoint, resizes them (antialiased,
`Data.images.resize_images`) to the dataset's resolution, trains a ResNet20 on
them with the CAS protocol (`Models.classifier.train_classifier`) and returns
the best VALIDATION accuracy on the real validation split. The real TEST
accuracy of that classifier is stored as the trial's user attributes
"test_top1" / "test_top5", after the objective value is fixed, and never
optimised: the original optimised test accuracy, which leaks the test set
into model selection (PAPER.md, "Known defects").

Every epoch's validation accuracy goes to `trial.report`, and the Hyperband
pruner (as the paper configured it; min resource 1 epoch, max resource the
classifier epochs, reduction factor 3) stops trials that fall behind.

All trials use the same generation seed and classifier seed, so two trials
differ only in their settings (common random numbers).

`objective="kid"` scores a trial by the kernel inception distance between its
images and the real training images instead (`Metrics.quality.kid_objective`;
minimised, no classifier per trial); its winner's CAS is measured afterwards
and recorded beside the accuracy-tuned one.

Search space
------------
| stage | inference steps | UGS | checkpoint epoch |
| --- | --- | --- | --- |
| enc (paper) | int [5, 50] | float [0, 7.5] | int [1, 50] |
| dif (paper) | int [5, is_1] | float [0, 2 * ugs_1] | int [1, 10] |

The checkpoint epochs offered are exactly those with a checkpoint in the
stage's folder (`Utils.paths.diffusion_checkpoint_dir`), so short runs and
the `tiny` preset (e.g. 6 epochs) never ask for one that does not exist;
with the paper's training (a checkpoint every epoch) that is the paper's
range. `max_steps` caps the upper end of the step range (CPU budgets; the
`quick` budget of `reproduce.py` caps it at the preset's default steps).

Storage, resume, several workers
--------------------------------
A study lives in an Optuna storage: by default the SQLite file
`Experiments/Exp_{exp}/{dataset}/optuna.db`; any Optuna RDB URL
(postgresql://, mysql://, sqlite://) or `journal:PATH` (a journal file on a
shared disk) lets several processes on several machines run one study at
once. Its name is the paper's `{dataset}_exp{exp}_study_{enc|dif}` (a
`_kid` suffix for the KID objective). `n_trials` is the TOTAL number of
finished (complete or pruned) trials wanted: rerunning a 2-trial study with
`n_trials=3` runs one more, and any number of workers together stop at
exactly `n_trials` (`run_study`). A trial that raises is marked FAIL by
Optuna and not counted; a trial left RUNNING by a killed process is marked
FAIL by the next worker that looks, immediately when its process (the
"worker" user attribute) is known dead on this machine, else once its
heartbeat (the "heartbeat" user attribute, refreshed every
HEARTBEAT_INTERVAL_S on every storage, the journal file included) is older
than GRACE_PERIOD_S. The protocol settings (preset, images per
trial, classifier epochs, ...) are stored in the study; resuming with other
settings is an error instead of a study mixing two protocols.

Example:
    >>> space = build_search_space("enc", checkpoint_epochs=[1, 2, 3], max_steps=25)
    >>> source = DiffusionImageSource(exp=0, dataset="digits", preset="tiny", stage="enc")
    >>> objective = GenerationObjective(source, space, load_dataset("digits"), num_imgs=500,
    ...                                 classifier_config=ClassifierConfig(epochs=5))
    >>> study = open_study(open_storage(default_storage_url(0, "digits")),
    ...                    study_name("digits", 0, "enc"), "maximize", seed=0, max_resource=5,
    ...                    protocol={"num_imgs": 500})
    >>> run_study(study, objective, n_trials=10)
    >>> study.best_trial.params        # {'inf_steps': 19, 'ugs': 2.7, 'enc_epoch': 3}
"""

import contextlib
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from tqdm.auto import tqdm

from Data.balance import balanced_labels
from Utils.cli import UserError
from Utils.io import merge_json
from Utils.paths import experiment_dir, optimization_plots_dir, pipeline_results_json

STAGES = ("enc", "dif")
OBJECTIVES = ("cas", "kid")
# The stage table's keys (published_cas.json, "pipeline" section).
STAGE_KEYS = {"enc": "after_class_encoder", "dif": "after_unet_finetune"}
DEFAULT_N_TRIALS = {"enc": 50, "dif": 40}
# The paper's ranges (PAPER.md stages 2 and 4); dif's upper bounds come from study #1's winner.
PAPER_STEPS = {"enc": (5, 50), "dif": (5, None)}
PAPER_UGS_MAX = 7.5
PAPER_CHECKPOINTS = {"enc": (1, 50), "dif": (1, 10)}
CHECKPOINT_PARAM = {"enc": "enc_epoch", "dif": "dif_epoch"}
STEPS_PARAM, UGS_PARAM = "inf_steps", "ugs"
STORAGE_FILE = "optuna.db"
# Study attributes of the one-standard-error rule (`best_trial`).
DEFAULT_SETTINGS_ATTR, VALIDATION_SIZE_ATTR = "default_settings", "validation_size"
# A running trial's worker writes a heartbeat every HEARTBEAT_INTERVAL_S; one silent for
# GRACE_PERIOD_S is failed by the next worker that looks. The environment overrides them for
# clusters whose workers may stall longer (and for tests that cannot wait minutes).
HEARTBEAT_INTERVAL_S = int(os.environ.get("SDDG_HEARTBEAT_INTERVAL_S", 30))
GRACE_PERIOD_S = int(os.environ.get("SDDG_GRACE_PERIOD_S", 120))
# A database server that does not answer within this is reported instead of waited on.
CONNECT_TIMEOUT_S = 10
TRIAL_STATES_COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# ------------------------------------------------------------------ search space ----

@dataclass(frozen=True)
class SearchSpace:
    """The three settings a trial draws, with their ranges.

    Attributes:
        stage: "enc" or "dif".
        steps: (low, high) inference steps, integers, inclusive.
        ugs: (low, high) unconditional guidance scale, float.
        checkpoint_epochs: the checkpoint epochs offered (sorted, all existing).

    Example:
        >>> space = build_search_space("dif", [1, 2, 3, 4], is_1=30, ugs_1=2.5)
        >>> space.suggest(trial)         # {'inf_steps': 17, 'ugs': 3.1, 'dif_epoch': 4}
    """

    stage: str
    steps: tuple
    ugs: tuple
    checkpoint_epochs: tuple

    @property
    def checkpoint_param(self):
        return CHECKPOINT_PARAM[self.stage]

    def suggest(self, trial):
        """Draws a trial's settings (Optuna parameter names = generate_dataset.py's flags)."""
        settings = {
            STEPS_PARAM: trial.suggest_int(STEPS_PARAM, *self.steps),
            UGS_PARAM: trial.suggest_float(UGS_PARAM, *self.ugs),
        }
        epochs = self.checkpoint_epochs
        step = _arithmetic_step(epochs)
        if step is not None:
            # An integer range keeps the order for TPE and may grow when more epochs are trained.
            settings[self.checkpoint_param] = trial.suggest_int(
                self.checkpoint_param, epochs[0], epochs[-1], step=step)
        else:
            settings[self.checkpoint_param] = int(trial.suggest_categorical(self.checkpoint_param,
                                                                            list(epochs)))
        return settings

    def describe(self):
        """One line for the command line and the report."""
        epochs = self.checkpoint_epochs
        shown = (f"{epochs[0]}..{epochs[-1]}" if _arithmetic_step(epochs) == 1 and len(epochs) > 1
                 else ", ".join(map(str, epochs)))
        return (f"{STEPS_PARAM} int [{self.steps[0]}, {self.steps[1]}], "
                f"{UGS_PARAM} float [{self.ugs[0]:g}, {self.ugs[1]:g}], "
                f"{self.checkpoint_param} in {{{shown}}}")

    def to_dict(self):
        return {"steps": list(self.steps), "ugs": list(self.ugs),
                self.checkpoint_param: list(self.checkpoint_epochs)}


def _arithmetic_step(values):
    """The common difference of a sorted progression (1 for a single value), else None."""
    if len(values) == 1:
        return 1
    steps = {b - a for a, b in zip(values, values[1:])}
    return steps.pop() if len(steps) == 1 else None


def build_search_space(stage, checkpoint_epochs, is_1=None, ugs_1=None, max_steps=None):
    """The paper's search space for `stage`, over the checkpoint epochs that exist.

    Args:
        stage: "enc" or "dif".
        checkpoint_epochs: epochs with a checkpoint of the stage's trained part.
        is_1, ugs_1: study #1's winning steps and UGS (required for "dif").
        max_steps: optional cap of the steps' upper bound (CPU budgets).
    """
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose enc or dif")
    epochs = tuple(sorted({int(e) for e in checkpoint_epochs}))
    if not epochs:
        raise UserError(f"no {stage} checkpoints to choose from")
    low, high = PAPER_STEPS[stage]
    if stage == "enc":
        ugs = (0.0, PAPER_UGS_MAX)
    else:
        if is_1 is None or ugs_1 is None:
            raise UserError("tuning dif needs study #1's winners: --is_1 and --ugs_1 "
                            "(or a finished enc study in the same storage)")
        if int(is_1) < 1 or float(ugs_1) < 0:
            raise UserError(f"--is_1 must be >= 1 and --ugs_1 >= 0, got {is_1} and {ugs_1}")
        high = int(is_1)
        ugs = (0.0, 2.0 * float(ugs_1))
    if max_steps is not None:
        high = min(high, int(max_steps))
    low = min(low, high)
    return SearchSpace(stage, (int(low), int(high)), (float(ugs[0]), float(ugs[1])), epochs)


# ------------------------------------------------------------------ images ----

def trial_labels(num_images, num_classes):
    """The labels of one trial's images: every class, balanced (Data/balance.py)."""
    if num_images < num_classes:
        raise UserError(f"{num_images} images cannot cover {num_classes} classes; "
                        f"ask for at least {num_classes}")
    return balanced_labels(num_images, num_classes)


class DiffusionImageSource:
    """Generates a trial's images in memory from a checkpoint of the stage being tuned.

    "enc": class-encoder checkpoint `enc_epoch` (for `tiny`, whose "enc" stage also
    trains the UNet from scratch, that checkpoint's UNet too). "dif": fine-tuned UNet
    checkpoint `dif_epoch` with the class-encoder checkpoint its fine-tuning used.
    Images come back at the dataset's native size (antialiased downsizing).

    Args:
        exp, dataset, preset: which checkpoints (Utils.paths.diffusion_checkpoint_dir).
        stage: "enc" or "dif".
        enc_epoch: for "dif", the class-encoder checkpoint (None: the one the
            fine-tuning recorded).
        batch_size: images per sampler call (does not change the images).
        jit_compile: compile the sampling step with XLA.

    Example:
        >>> source = DiffusionImageSource(0, "digits", "tiny", "enc")
        >>> source.checkpoint_epochs()                      # [1, 2, ..., 6]
        >>> x = source({"inf_steps": 20, "ugs": 3.0, "enc_epoch": 6}, labels, seed=0)
    """

    def __init__(self, exp, dataset, preset, stage, enc_epoch=None, batch_size=250, jit_compile=False):
        from Data.registry import get_spec
        from Models.diffusion import checkpoints

        self.exp, self.stage = exp, stage
        self.spec = get_spec(dataset)
        self.preset = preset
        self.enc_epoch = enc_epoch
        self.batch_size = int(batch_size)
        self.jit_compile = bool(jit_compile)
        self._checkpoints = checkpoints
        self._model = None
        self._loaded = None

    def checkpoint_epochs(self):
        """Epochs with a complete checkpoint of this stage (empty list: none yet)."""
        return self._checkpoints.available_epochs(self.exp, self.spec.name, self.stage)

    def model_for(self, epoch):
        """The ClassConditionalDiffusion holding checkpoint `epoch` (loaded once per epoch)."""
        key = (self.stage, int(epoch), self.enc_epoch)
        if self._loaded != key:
            self._model = self._checkpoints.load_for_generation(
                self.exp, self.spec.name, self.preset, self.stage, int(epoch),
                enc_epoch=self.enc_epoch, model=self._model)
            self._loaded = key
        return self._model

    def __call__(self, settings, labels, seed):
        from Data.images import resize_images

        model = self.model_for(settings[CHECKPOINT_PARAM[self.stage]])
        images = model.generate(labels, num_steps=int(settings[STEPS_PARAM]),
                                guidance_scale=float(settings[UGS_PARAM]), seed=seed,
                                batch_size=self.batch_size, jit_compile=self.jit_compile,
                                progress=len(labels) >= 4 * self.batch_size)
        return resize_images(images, self.spec.image_size)


# ------------------------------------------------------------------ objective ----

class OptunaPruning:
    """A Keras callback: reports each epoch's validation accuracy to the trial; stops when pruned.

    Built lazily as a `keras.callbacks.Callback` subclass so this module imports without Keras.

    Example:
        >>> pruning = OptunaPruning.make(trial)
        >>> train_classifier(..., extra_callbacks=[pruning])
        >>> if pruning.pruned_at: raise optuna.TrialPruned()
    """

    @staticmethod
    def make(trial, monitor="val_accuracy"):
        import keras

        class _Pruning(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.pruned_at = None

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(monitor)
                if value is None:
                    return
                # step = epochs completed, the pruner's resource.
                trial.report(float(value), step=epoch + 1)
                if trial.should_prune():
                    self.pruned_at = epoch + 1
                    self.model.stop_training = True

        return _Pruning()


class GenerationObjective:
    """The Optuna objective: generate with the trial's settings, score on REAL validation data.

    Args:
        source: callable(settings, labels, seed) -> uint8 images (N, S, S, 3) at the
            dataset's size (`DiffusionImageSource`).
        space: the `SearchSpace`.
        splits: the real `Data.loaders.Splits` (train for KID, val for the objective,
            test only for the recorded test accuracy).
        num_imgs: generated images per trial, balanced over the classes.
        classifier_config: the ResNet20 protocol (`ClassifierConfig`).
        seed: generation and classifier seed, the same for every trial.
        objective: "cas" (validation accuracy, maximised) or "kid" (minimised).
        kid_objective: for "kid", callable(images, labels, real_images, real_labels, seed) -> float
            (default `Metrics.quality.kid_objective`).
        verbose: `model.fit` verbosity.

    Example:
        >>> objective = GenerationObjective(source, space, splits, 4000, ClassifierConfig())
        >>> study.optimize(objective, n_trials=1)
        >>> objective.evaluate({"inf_steps": 50, "ugs": 7.5, "enc_epoch": 50})   # no-opt row
    """

    def __init__(self, source, space, splits, num_imgs, classifier_config, seed=0, objective="cas",
                 kid_objective=None, verbose=0):
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
        self.source, self.space, self.splits = source, space, splits
        self.spec = splits.spec
        self.labels = trial_labels(int(num_imgs), self.spec.num_classes)
        self.classifier_config = classifier_config
        self.seed = int(seed)
        self.objective = objective
        self.kid_objective = kid_objective
        self.verbose = verbose

    @property
    def direction(self):
        return "minimize" if self.objective == "kid" else "maximize"

    def generate(self, settings):
        """The trial's images (uint8, dataset size) and labels."""
        images = np.asarray(self.source(settings, self.labels, self.seed))
        expected = (len(self.labels), self.spec.image_size, self.spec.image_size, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"the image source returned {images.dtype} {images.shape}, expected uint8 {expected}")
        return images, self.labels

    def validation_score(self, images, labels, callbacks=()):
        """Trains a ResNet20 on the images; returns (model, history, best validation accuracy).

        Reads the real validation split only.
        """
        from Models.classifier import train_classifier

        model, history = train_classifier(
            images, labels, self.splits.x_val, self.splits.y_val, self.spec.num_classes,
            config=self.classifier_config, seed=self.seed, extra_callbacks=list(callbacks),
            verbose=self.verbose)
        return model, history, float(max(history["val_accuracy"]))

    def test_accuracy(self, model):
        """Top-1 / top-5 on the real TEST split: recorded, never optimised."""
        from Models.classifier import evaluate_classifier

        result = evaluate_classifier(model, self.splits.x_test, self.splits.y_test, self.spec.label_names)
        return {"top1": result["top1"], "top5": result["top5"], "top_k": result["top_k"]}

    def kid(self, images, labels):
        kid_objective = self.kid_objective
        if kid_objective is None:
            from Metrics.quality import kid_objective
        return float(kid_objective(images, labels, self.splits.x_train, self.splits.y_train, seed=self.seed))

    def __call__(self, trial):
        settings = self.space.suggest(trial)
        started = time.perf_counter()
        images, labels = self.generate(settings)
        trial.set_user_attr("seconds_generate", round(time.perf_counter() - started, 2))
        if self.objective == "kid":
            value = self.kid(images, labels)
            trial.set_user_attr("kid", value)
            return value
        pruning = OptunaPruning.make(trial)
        started = time.perf_counter()
        model, history, value = self.validation_score(images, labels, callbacks=[pruning])
        trial.set_user_attr("seconds_train", round(time.perf_counter() - started, 2))
        trial.set_user_attr("epochs_run", history["epochs_run"])
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"validation accuracy {value:.4f} behind after epoch {pruning.pruned_at}")
        trial.set_user_attr("val_accuracy", value)
        # The objective value is fixed above; only now is the test split looked at.
        test = self.test_accuracy(model)
        trial.set_user_attr("test_top1", test["top1"])
        trial.set_user_attr("test_top5", test["top5"])
        return value

    def evaluate(self, settings):
        """Scores fixed settings (the no-opt row, a KID winner): validation and test accuracy."""
        images, labels = self.generate(settings)
        model, history, value = self.validation_score(images, labels)
        test = self.test_accuracy(model)
        return {"top1": test["top1"], "top5": test["top5"], "val_accuracy": value,
                "epochs_run": history["epochs_run"], "settings": dict(settings)}


def default_settings(stage, preset, checkpoint_epochs):
    """The no-optimisation settings: the preset's default steps and UGS, the last checkpoint."""
    return {STEPS_PARAM: int(preset.default_inference_steps), UGS_PARAM: float(preset.default_guidance_scale),
            CHECKPOINT_PARAM[stage]: int(max(checkpoint_epochs))}


# ------------------------------------------------------------------ storage and study ----

def default_storage_url(exp, dataset):
    """The SQLite file in the experiment folder, as an absolute sqlite:/// URL."""
    return f"sqlite:///{(experiment_dir(exp, dataset) / STORAGE_FILE).resolve()}"


def redact(url):
    """The URL with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an RDB URL (journal:...) or unparsable: nothing to hide we can find
        return url


def open_storage(url, create_folder=False):
    """An Optuna storage for `url`; any failure is a one-line UserError.

    url: an RDB URL (sqlite:///path.db, postgresql://... through psycopg 3, mysql://...),
    or `journal:PATH` for a journal file on a shared disk (O_EXCL lock files). A
    server that does not answer fails within CONNECT_TIMEOUT_S.
    create_folder: create a sqlite file's folder (the default storage's experiment folder);
    otherwise a missing folder is an error, not a silently created tree.
    """
    url = str(url).strip()
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):]).expanduser()
            if not url[len("journal:"):].strip():
                raise UserError("--storage journal: needs a file, e.g. journal:/shared/studies/optuna.log")
            if not path.parent.is_dir():
                raise UserError(f"cannot open the Optuna journal {path}: folder {path.parent} does not exist")
            if path.exists() and not path.is_file():
                raise UserError(f"cannot open the Optuna journal {path}: it is not a file")
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

            # O_EXCL lock files work on NFS v3+ and local disks alike, where symlink locks need NFS v2 semantics.
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if "://" not in url:
            raise UserError(f"--storage {url!r} is not a storage URL: use sqlite:///PATH.db, "
                            "postgresql://..., mysql://... or journal:PATH")
        if url.startswith("sqlite:///"):
            folder = Path(url[len("sqlite:///"):]).parent
            if create_folder:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                raise UserError(f"cannot open the Optuna storage {url}: folder {folder} does not exist")
        if url.startswith("sqlite"):
            engine_kwargs = {"connect_args": {"timeout": 60}}  # seconds to wait for another writer's lock
        elif url.startswith(("postgresql", "mysql", "mariadb")):
            engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
        else:
            engine_kwargs = None
        return _open_rdb_storage(url, engine_kwargs)
    except UserError:
        raise
    except Exception as e:  # SQLAlchemy/driver errors: unknown dialect, missing driver, refused connection
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open the Optuna storage {redact(url)}: {reason}") from None


def _open_rdb_storage(url, engine_kwargs, attempts=5):
    """RDBStorage(url), retried when workers starting together race to create its tables.

    Optuna creates the schema when it finds none; on a new database two workers
    doing so at once make one fail ("already exists"), and a moment later the
    tables are there. Connection errors are not retried: they fail at once.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                                  grace_period=GRACE_PERIOD_S)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


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


def _process_start_ticks(pid):
    """Start time of process `pid` in clock ticks since boot (Linux), else ''. Guards against PID reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def worker_id():
    """host:pid:start-ticks of this process, stored on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start_ticks(os.getpid())}"


def _worker_alive(worker):
    """True/False for a worker on this host; None when it ran elsewhere (only the heartbeat knows)."""
    try:
        host, pid, ticks = worker.rsplit(":", 2)
        pid = int(pid)
    except (ValueError, AttributeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _process_start_ticks(pid) == ticks


def _worker_dead(trial, now=None):
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
    """Marks FAIL the RUNNING trials of dead workers (`_worker_dead`); returns their numbers."""
    from optuna.trial import TrialState

    running = (TrialState.RUNNING,)
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if isinstance(study._storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)  # Optuna's own heartbeat (RDB storages)
    for trial in study.get_trials(deepcopy=False, states=running):
        if _worker_dead(trial):
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                failed.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker finished or failed it meanwhile
    return failed


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
        if other.number < trial.number and (other.state != TrialState.RUNNING or not _worker_dead(other)):
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


# ------------------------------------------------------------------ results ----

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


# ------------------------------------------------------------------ plots ----

def save_study_plots(study, out_dir, checkpoint_param, log=print, value_label="objective value"):
    """The paper's Optuna plots as PNG files in out_dir; returns {name: path}.

    history, contour of steps x UGS, contour of all three settings, importances,
    slices, timeline, and the per-epoch validation curves the pruner saw. A plot
    Optuna cannot draw yet (e.g. importances from fewer than two completed trials)
    is skipped with a note.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from Utils.io import atomic_path

    out_dir = Path(out_dir)
    plots = {
        "history": lambda: ovm.plot_optimization_history(study),
        "contour_steps_ugs": lambda: ovm.plot_contour(study, params=[STEPS_PARAM, UGS_PARAM]),
        "contour": lambda: ovm.plot_contour(study, params=[STEPS_PARAM, UGS_PARAM, checkpoint_param]),
        "importances": lambda: ovm.plot_param_importances(study),
        "slice": lambda: ovm.plot_slice(study),
        "timeline": lambda: ovm.plot_timeline(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    saved = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length is less than 2" etc.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every matplotlib plot
        for name, draw in plots.items():
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError, KeyError) as e:
                log(f"note: Optuna plot '{name}' skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            figure = np.ravel(axes)[0].figure if isinstance(axes, np.ndarray) else axes.figure
            if not figure.axes or all(not ax.has_data() for ax in figure.axes):
                plt.close(figure)
                log(f"note: Optuna plot '{name}' skipped: nothing to draw yet")
                continue
            if name == "history":
                np.ravel(axes)[0].set_ylabel(value_label)
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            path = out_dir / f"{name}.png"
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            saved[name] = path
    optuna.logging.set_verbosity(verbosity)
    return saved


def plots_dir(exp, dataset, stage, objective="cas"):
    """optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/ (a kid/ sub-folder for the KID objective)."""
    folder = optimization_plots_dir(exp, dataset, stage)
    return folder / "kid" if objective == "kid" else folder


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



# ------------------------------------------------------------------ the whole stage ----

@dataclass
class TuningOptions:
    """Everything `run_tuning` needs; the defaults are the paper's (hyp_opt.py's flags).

    Attributes:
        dataset, stage ("enc"/"dif"), exp, preset: what is tuned.
        optimize: run the study (True) or score the default settings (False, the "no_opt" row).
        n_trials: total finished trials wanted (None: 50 for enc, 40 for dif).
        num_imgs: generated images per trial (balanced over classes).
        classifier_epochs, classifier_batch_size: the ResNet20 protocol per trial.
        batch_size: generation batch (images per sampler call).
        enc_epoch: for dif, the class-encoder checkpoint (None: the one the fine-tuning used).
        is_1, ugs_1: for dif, study #1's winning steps and UGS (None: read from the enc study).
        storage: Optuna storage URL (None: the SQLite file in the experiment folder).
        seed: TPE sampler, generation and classifier seed.
        objective: "cas" or "kid".
        max_steps: cap of the steps range (None: the paper's).
        save_plots: write the Optuna plots.
        data_dir: where the real dataset lives.
        jit_compile: XLA for the sampler.
        prune_after: Hyperband's minimum resource, the epochs before a trial can be pruned.
        enqueue_defaults: make a new study's first trial the default settings (last
            checkpoint, preset steps and UGS, clipped to the space), so the winner is never
            worse on validation than no optimisation: useful for short studies; off in the paper.
    """

    dataset: str
    stage: str
    exp: object = 0
    preset: str = "sd1"
    optimize: bool = True
    n_trials: object = None
    num_imgs: int = 4000
    classifier_epochs: int = 100
    classifier_batch_size: int = 256
    batch_size: int = 250
    enc_epoch: object = None
    is_1: object = None
    ugs_1: object = None
    storage: object = None
    seed: int = 0
    objective: str = "cas"
    max_steps: object = None
    save_plots: bool = False
    data_dir: object = None
    jit_compile: bool = False
    prune_after: int = 1
    enqueue_defaults: bool = False


def tuning_study_name(dataset, exp, stage, objective="cas"):
    """The paper's study name, with a `_kid` suffix for the KID objective."""
    from Utils.paths import study_name

    name = study_name(dataset, exp, stage)
    return f"{name}_kid" if objective == "kid" else name


def study_winner(storage, dataset, exp, stage, objective="cas"):
    """The best trial of an existing study in `storage`, or None when there is none."""

    name = tuning_study_name(dataset, exp, stage, objective)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    return best_trial(study) if completed_trials(study) else None


def check_options(options):
    """Validates the options and opens the storage, before anything heavy is imported or written.

    Returns the storage: None when none is given and the default SQLite file does not exist
    yet (run_tuning creates it after its own checks). Every problem is a one-line UserError.
    """
    from Data.registry import get_spec
    from Models.diffusion.presets import get_preset

    o = options
    spec, _ = get_spec(o.dataset), get_preset(o.preset)
    if o.stage not in STAGES:
        raise UserError(f"--train_model must be enc or dif, got {o.stage!r}")
    if o.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {o.objective!r}")
    n_trials = DEFAULT_N_TRIALS[o.stage] if o.n_trials is None else o.n_trials
    for flag, value in (("--n_trials", n_trials), ("--num_imgs", o.num_imgs), ("--prune_after", o.prune_after),
                        ("--classifier_epochs", o.classifier_epochs), ("--batch_size", o.batch_size),
                        ("--classifier_batch_size", o.classifier_batch_size)):
        if int(value) < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if o.num_imgs < spec.num_classes:
        raise UserError(f"--num_imgs {o.num_imgs} is fewer than {spec.name}'s {spec.num_classes} classes")
    if o.stage == "enc" and (o.enc_epoch is not None or o.is_1 is not None or o.ugs_1 is not None):
        raise UserError("--enc_epoch, --is_1 and --ugs_1 are for --train_model dif "
                        "(tuning enc searches the class-encoder epoch)")
    if not o.optimize:
        # Scoring the defaults needs no study, but reuses one's trial of the same settings when there is one.
        if o.storage:
            return open_storage(o.storage)
        default = experiment_dir(o.exp, spec.name) / STORAGE_FILE
        return open_storage(default_storage_url(o.exp, spec.name)) if default.is_file() else None
    if o.storage:
        return open_storage(o.storage)
    # The default SQLite file's folder is created by run_tuning once the checkpoints and the
    # real data are found, so a run stopped by bad input leaves no empty experiment folder.
    default = experiment_dir(o.exp, spec.name) / STORAGE_FILE
    return open_storage(default_storage_url(o.exp, spec.name)) if default.is_file() else None


def reusable_default_trial(storage, name, settings, protocol):
    """A COMPLETE trial of study `name` with exactly `settings` and the same protocol, or None.

    Its numbers are what scoring those settings again would give (same seed, images and
    classifier protocol), so the no-opt row takes them instead of recomputing them.
    """
    if storage is None:
        return None

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    stored = study.user_attrs.get("protocol", {})
    if any(stored.get(k) != v for k, v in protocol.items()):
        return None
    for trial in completed_trials(study):
        if as_builtin(trial.params) == as_builtin(settings) and "test_top1" in trial.user_attrs:
            return study, trial
    return None


_UNSET = object()


def run_tuning(options, log=print, storage=_UNSET):
    """hyp_opt.py's work: tune (or score the defaults of) one stage; returns the stage-table cell.

    Writes the study into the storage, the cell into CAS Results/pipeline_optimization_exp{exp}.json
    ("opt", "opt_kid" or "no_opt") and, with save_plots, the Optuna plots.
    storage: from `check_options` (left out: it is called here).
    """
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Models.classifier import ClassifierConfig
    from Models.diffusion.presets import get_preset

    o = options
    if storage is _UNSET:
        storage = check_options(o)
    # Our own line per trial replaces Optuna's INFO lines.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, preset = get_spec(o.dataset), get_preset(o.preset)
    n_trials = DEFAULT_N_TRIALS[o.stage] if o.n_trials is None else int(o.n_trials)
    is_1, ugs_1 = o.is_1, o.ugs_1
    if o.optimize and o.stage == "dif" and (is_1 is None or ugs_1 is None):
        winner = study_winner(storage, spec.name, o.exp, "enc", o.objective) if storage is not None else None
        if winner is None:
            raise UserError(f"tuning dif needs --is_1 and --ugs_1, or a finished study "
                            f"{tuning_study_name(spec.name, o.exp, 'enc', o.objective)} in the storage")
        is_1 = winner.params[STEPS_PARAM] if is_1 is None else is_1
        ugs_1 = winner.params[UGS_PARAM] if ugs_1 is None else ugs_1
        log(f"study #1's winner: is_1={is_1}, ugs_1={ugs_1:.4g}")

    source = DiffusionImageSource(o.exp, spec.name, preset, o.stage, enc_epoch=o.enc_epoch,
                                  batch_size=o.batch_size, jit_compile=o.jit_compile)
    epochs = source.checkpoint_epochs()
    if not epochs:
        from Utils.paths import diffusion_checkpoint_dir

        raise UserError(f"no {o.stage} checkpoints in {diffusion_checkpoint_dir(o.exp, spec.name, o.stage)}: "
                        f"run SD_adapting.py --dataset {spec.name} --train_model {o.stage} --exp {o.exp} first")
    space = (build_search_space(o.stage, epochs, is_1=is_1, ugs_1=ugs_1, max_steps=o.max_steps)
             if o.optimize else None)
    splits = load_dataset(spec.name, data_dir=o.data_dir)
    if storage is None and o.optimize:
        storage = open_storage(default_storage_url(o.exp, spec.name), create_folder=True)
    config = ClassifierConfig(epochs=int(o.classifier_epochs), batch_size=int(o.classifier_batch_size))
    objective = GenerationObjective(source, space, splits, o.num_imgs, config, seed=o.seed,
                                    objective=o.objective)
    common = {"num_imgs": int(o.num_imgs), "classifier_epochs": int(o.classifier_epochs),
              "classifier_batch_size": int(o.classifier_batch_size), "seed": int(o.seed),
              "preset": preset.name}

    if not o.optimize:
        settings = default_settings(o.stage, preset, epochs)
        name = tuning_study_name(spec.name, o.exp, o.stage, "cas")
        match = {**common, "dataset": spec.name, "stage": o.stage, "objective": "cas"}
        if o.stage == "dif" and o.enc_epoch is not None:
            match["enc_epoch"] = o.enc_epoch
        found = reusable_default_trial(storage, name, settings, match)
        if found:
            study, trial = found
            log(f"the default settings {settings} were trial {trial.number} of study {name} "
                f"(same images, seed and classifier protocol): taking its numbers")
            result = {"top1": trial.user_attrs["test_top1"], "top5": trial.user_attrs["test_top5"],
                      "val_accuracy": trial.value, "epochs_run": trial.user_attrs.get("epochs_run"),
                      "settings": settings, "from_trial": {"study": name, "trial": trial.number}}
        else:
            log(f"scoring the default settings {settings} ({o.num_imgs} images, "
                f"{o.classifier_epochs} classifier epochs)")
            result = objective.evaluate(settings)
        entry = {**result, "settings": as_builtin(result["settings"]), **common}
        record_pipeline(o.exp, spec.name, o.stage, "no_opt", entry)
        log(f"no optimisation: validation {entry['val_accuracy']:.4f}, test top-1 {entry['top1']:.4f}, "
            f"top-5 {entry['top5']:.4f}")
        return entry

    name = tuning_study_name(spec.name, o.exp, o.stage, o.objective)
    protocol = {**common, "dataset": spec.name, "stage": o.stage, "objective": o.objective}
    if o.stage == "dif":
        protocol.update(is_1=int(is_1), ugs_1=float(ugs_1), enc_epoch=o.enc_epoch)
    study = open_study(storage, name, objective.direction, o.seed,
                       max_resource=o.classifier_epochs if o.objective == "cas" else None,
                       protocol=protocol, min_resource=o.prune_after)
    if o.enqueue_defaults and not study.get_trials(deepcopy=False):
        first = default_settings(o.stage, preset, epochs)
        first[STEPS_PARAM] = min(max(first[STEPS_PARAM], space.steps[0]), space.steps[1])
        first[UGS_PARAM] = min(max(first[UGS_PARAM], space.ugs[0]), space.ugs[1])
        study.enqueue_trial(first)
        study.set_user_attr(DEFAULT_SETTINGS_ATTR, first)
        if o.objective == "cas":
            study.set_user_attr(VALIDATION_SIZE_ATTR, int(len(objective.splits.y_val)))
        log(f"first trial: the default settings {first}")
    log(f"study {name} in {redact(o.storage or default_storage_url(o.exp, spec.name))}: {space.describe()}")
    run_study(study, objective, n_trials, log=log, seed=o.seed)
    if o.save_plots:
        saved = save_study_plots(study, plots_dir(o.exp, spec.name, o.stage, o.objective),
                                 space.checkpoint_param, log=log,
                                 value_label=("KID to the real training images (minimised)" if o.objective == "kid"
                                              else "validation top-1 accuracy (maximised)"))
        if saved:
            log(f"plots: {Path(next(iter(saved.values()))).parent}")
    winner = best_trial(study)
    entry = trial_entry(study, winner, o.objective, space)
    entry.update(settings=as_builtin(winner.params), **common)
    if o.objective == "kid":
        # The KID winner's CAS, with the same classifier protocol as the accuracy-tuned row.
        log(f"KID winner {winner.params}: training a classifier on its images for its CAS")
        result = objective.evaluate(winner.params)
        entry.update(top1=result["top1"], top5=result["top5"], val_accuracy=result["val_accuracy"])
    record_pipeline(o.exp, spec.name, o.stage, "opt_kid" if o.objective == "kid" else "opt", entry)
    counts = count_trials(study)
    if study.best_trial.number != winner.number:
        log(f"trial {study.best_trial.number} led the default settings by less than one standard error of "
            f"the validation accuracy: the default stays the winner")
    kid = f"KID {entry['kid']:.4g}, " if o.objective == "kid" else ""
    log(f"best of {sum(counts.values())} trial(s) {counts}: trial {winner.number} {as_builtin(winner.params)} "
        f"-> {kid}validation {entry['val_accuracy']:.4f}, test top-1 {entry['top1']:.4f} (recorded, not optimised)")
    return entry
