"""The tune stage (PAPER.md stages 2 and 4): Bayesian optimisation of the generation settings.

`hyp_opt.py` is its command line; `reproduce.py` calls `run` directly.

    settings = TuneSettings(dataset="digits", preset="small", train_model="enc", n_trials=2,
                            num_imgs=250, classifier_epochs=4, batch_size=64)
    if not is_done(settings):
        result = run(settings)            # result.settings: {"inf_steps", "ugs", "enc_epoch"} (+ "sampler")
    enc = winner_settings("0", "digits", "enc")   # tune enc's winner, for the dif stage's settings

One run tunes (or, with optimize=False, scores the default settings of) one
stage: "enc" searches the class-encoder checkpoint, the inference steps and
the guidance scale; "dif" the fine-tuned UNet's checkpoint, with the steps and
guidance ranges set by study #1's winner (is_1, ugs_1: given, or read from
the enc study in the same storage). Trials sample with `sampler` (DDIM, the
paper's), or, with `search_samplers`, the study also chooses among those;
a sampler other than DDIM is part of the winner's settings (and so of the
generate stage's, in reproduce.py) and of the protocol a resumed study must match; so is a
`timestep_spacing` given to the study (not searched). It writes the study into the storage
(default: the SQLite file Experiments/Exp_{exp}/{dataset}/optuna.db), one
cell of the stage table CAS Results/pipeline_optimization_exp{exp}.json
("opt", "opt_kid" or "no_opt") and, with save_plots, the Optuna plots.
Killed, the same settings resume: n_trials is the total wanted, and any
number of workers on one storage stop at exactly n_trials.

The machinery is in `Pipeline/tuning/` (search space, images, objective,
storage, workers, the trial loop, results, plots).
"""

from dataclasses import dataclass, field
from pathlib import Path

from Pipeline.tuning.images import GENERATION_BATCH_SIZE
from Pipeline.tuning.objective import OBJECTIVES
from Pipeline.tuning.results import STAGE_KEYS, cell_key, cell_matches, read_cell, winner_settings
from Pipeline.tuning.space import CHECKPOINT_PARAM, SAMPLER_PARAM, SPACING_PARAM, STAGES, STEPS_PARAM, UGS_PARAM
from Pipeline.tuning.storage import default_storage_path, default_storage_url, open_storage
from Utils.cli import UserError, non_negative_float, non_negative_int, positive_int
from Pipeline.common_settings import (accept_unverified_setting, conditioning_setting, conditioning_spec,
                                      data_dir_setting, dataset_setting, dataset_spec, experiment_setting,
                                      image_size_setting, load_real, preset_setting, prompt_template_setting,
                                      sampler_setting, ti_tokens_setting, timestep_spacing_setting,
                                      train_subset_seed_setting, train_subset_setting)
from Models.diffusion.schedulers import DEFAULT_SAMPLER, SAMPLERS
from Utils.runtime import RuntimeSettings
from Utils.settings import ADDED, PAPER, setting

SCRIPT = "hyp_opt.py"
# The paper's studies: 50 trials for the class encoder, 40 for the fine-tuned UNet.
DEFAULT_N_TRIALS = {"enc": 50, "dif": 40}

__all__ = ["SCRIPT", "DEFAULT_N_TRIALS", "TuneSettings", "TuneResult", "TunePlan", "plan", "is_done", "run",
           "winner_settings"]


@dataclass(frozen=True, kw_only=True)
class TuneSettings(RuntimeSettings):
    """Every flag of hyp_opt.py, declared once; the defaults are the paper's."""

    dataset: str = dataset_setting()
    train_model: str = setting("enc", choices=STAGES, group=PAPER,
                               help="tune the class-encoder checkpoints (enc, study #1) or the fine-tuned "
                                    "UNet's (dif, study #2)")
    exp: str = experiment_setting()
    optimize: bool = setting(True, group=PAPER,
                             help="run the study; False scores the preset's default steps and UGS with the "
                                  "last checkpoint (the stage table's no_opt row)")
    batch_size: int = setting(256, type=positive_int, group=PAPER,
                              help="the ResNet20's training batch per trial (the CAS protocol)")
    enc_epoch: int = setting(None, type=positive_int, group=PAPER,
                             help="dif only: the class-encoder checkpoint the fine-tuning used "
                                  "(default: the one recorded beside the UNet checkpoints)")
    num_imgs: int = setting(4000, type=positive_int, group=PAPER,
                            help="generated images per trial, balanced over classes")
    is_1: int = setting(None, type=positive_int, group=PAPER,
                        help="dif only: study #1's winning steps, top of the steps range "
                             "(default: read from the enc study in the same storage)")
    ugs_1: float = setting(None, type=non_negative_float, group=PAPER,
                           help="dif only: study #1's winning UGS; the range is [0, 2*ugs_1] "
                                "(default: from the enc study)")
    save_plots: bool = setting(False, group=PAPER,
                               help="write the Optuna plots (history, contours, importances, slices, timeline) "
                                    "as PNG")
    preset: str = preset_setting()
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()
    n_trials: int = setting(None, type=positive_int, group=ADDED,
                            help=f"TOTAL finished trials wanted, counting earlier runs "
                                 f"(default {DEFAULT_N_TRIALS['enc']} enc, {DEFAULT_N_TRIALS['dif']} dif)")
    classifier_epochs: int = setting(100, type=positive_int, group=ADDED,
                                     help="ResNet20 epochs per trial (the CAS protocol)")
    generation_batch_size: int = setting(GENERATION_BATCH_SIZE, type=positive_int, group=ADDED,
                                         help="images per sampler call (the paper's 250; does not change the "
                                              "images)")
    storage: str = setting(None, group=ADDED,
                           help="Optuna storage: sqlite:///PATH.db, postgresql://..., mysql://..., or "
                                "journal:PATH (default: sqlite file Experiments/Exp_{exp}/{dataset}/optuna.db)")
    seed: int = setting(0, type=non_negative_int, group=ADDED, help="sampler, generation and classifier seed")
    objective: str = setting("cas", choices=OBJECTIVES, group=ADDED,
                             help="cas: validation accuracy of a ResNet20 per trial; kid: kernel inception "
                                  "distance to the real training images (no classifier per trial; the "
                                  "winner's CAS is recorded beside the accuracy-tuned one)")
    max_steps: int = setting(None, type=positive_int, group=ADDED,
                             help="cap the top of the steps range (CPU runs; default: the paper's range)")
    prune_after: int = setting(1, type=positive_int, group=ADDED,
                               help="Hyperband's minimum resource: classifier epochs before a trial can be "
                                    "pruned (1: Optuna's default, as the paper configured it)")
    enqueue_defaults: bool = setting(False, group=ADDED,
                                     help="a new study's first trial uses the default settings (last checkpoint, "
                                          "the preset's steps and UGS), displaced only by a trial better by more "
                                          "than one standard error of the validation accuracy; for short studies "
                                          "(reproduce.py's quick budget), off in the paper")
    sampler: str = sampler_setting()
    timestep_spacing: str = timestep_spacing_setting()
    conditioning: str = conditioning_setting()
    prompt_template: str = prompt_template_setting()
    ti_tokens: int = ti_tokens_setting()
    search_samplers: tuple = setting(None, choices=tuple(SAMPLERS), nargs="+", metavar="SAMPLER", group=ADDED,
                                     help="also search the sampler among these, a categorical beside steps and "
                                          "UGS (default: not searched, every trial uses --sampler; the paper's "
                                          "space); the first is the default trial's (--enqueue_defaults)")

    def __post_init__(self):
        super().__post_init__()
        if self.train_model == "enc" and (self.enc_epoch is not None or self.is_1 is not None
                                          or self.ugs_1 is not None):
            raise UserError("--enc_epoch, --is_1 and --ugs_1 are for --train_model dif "
                            "(tuning enc searches the class-encoder epoch)")
        if self.search_samplers and not self.optimize:
            raise UserError("--search_samplers needs a study (--optimize True); --sampler sets the sampler "
                            "of the default settings")
        if self.multi_gpu:
            raise UserError(f"--multi_gpu is not used by {SCRIPT}: run one worker per GPU "
                            "(CUDA_VISIBLE_DEVICES) on one shared --storage instead")

    def resolved(self):
        """The settings with n_trials filled in (the paper's 50 for enc, 40 for dif)."""
        if self.n_trials is not None:
            return self
        return self.replace(n_trials=DEFAULT_N_TRIALS[self.train_model])

    @property
    def key(self):
        """The stage-table cell this run writes: "opt", "opt_kid" or "no_opt"."""
        return cell_key(self.optimize, self.objective)


@dataclass(frozen=True)
class TuneResult:
    """One stage-table cell: the winner's (or the default) settings and what they scored.

    Attributes:
        stage: "enc" or "dif".
        key: the cell, "opt", "opt_kid" or "no_opt".
        settings: {"inf_steps", "ugs", "enc_epoch" | "dif_epoch"} (generate_dataset.py's flags),
            "sampler" unless it is DDIM, and "timestep_spacing" when the study was given one.
        val_accuracy: best validation top-1 of the classifier trained on these settings' images.
        top1, top5: its real test accuracy (recorded, never optimised).
        storage_url: the study's storage (None: no-opt with no study to reuse).
        study, trial: the study's name and the winning trial's number (None for no-opt
            scored afresh).
        trials: {state: count} of the study's trials (empty for no-opt).
        kid: the KID winner's kernel inception distance (objective "kid").
        entry: the cell as written to the stage table.
    """

    stage: str
    key: str
    settings: dict
    val_accuracy: float
    top1: float
    top5: float
    storage_url: object = None
    study: object = None
    trial: object = None
    trials: dict = field(default_factory=dict)
    kid: object = None
    entry: dict = field(default_factory=dict)

    @property
    def inf_steps(self):
        return self.settings[STEPS_PARAM]

    @property
    def sampler(self):
        return self.settings.get(SAMPLER_PARAM, DEFAULT_SAMPLER)

    @property
    def ugs(self):
        return self.settings[UGS_PARAM]

    @property
    def epoch(self):
        """The tuned stage's checkpoint epoch (enc_epoch for enc, dif_epoch for dif)."""
        return self.settings[CHECKPOINT_PARAM[self.stage]]

    @classmethod
    def from_cell(cls, stage, key, cell, storage_url=None):
        from_trial = cell.get("from_trial") or {}
        return cls(stage=stage, key=key, settings=dict(cell["settings"]), val_accuracy=cell.get("val_accuracy"),
                   top1=cell.get("top1"), top5=cell.get("top5"), storage_url=storage_url,
                   study=cell.get("study", from_trial.get("study")), trial=cell.get("trial", from_trial.get("trial")),
                   trials=dict(cell.get("trials", {})), kid=cell.get("kid"), entry=dict(cell))


@dataclass(frozen=True)
class TunePlan:
    """The settings checked against the registry, the preset, the storage and the checkpoints."""

    settings: TuneSettings     # resolved (n_trials filled in)
    spec: object
    preset: object
    storage: object            # the opened Optuna storage; None: the default SQLite file, not created yet
    storage_url: str
    protocol: dict             # the stage-table cell's PROTOCOL_KEYS
    checkpoint_epochs: list
    is_1: object
    ugs_1: object


def _protocol(s, spec, preset):
    protocol = {"num_imgs": int(s.num_imgs), "classifier_epochs": int(s.classifier_epochs),
                "classifier_batch_size": int(s.batch_size), "seed": int(s.seed), "preset": preset.name}
    # Only when not the paper's: cells and studies recorded before the sampler was a setting still match.
    if s.search_samplers:
        protocol["search_samplers"] = list(dict.fromkeys(s.search_samplers))
    elif s.sampler != DEFAULT_SAMPLER:
        protocol["sampler"] = s.sampler
    if s.timestep_spacing:
        protocol["timestep_spacing"] = s.timestep_spacing
    return protocol


def _with_fixed_choices(settings, s):
    """A cell's settings naming the sampler when it is not DDIM and the timestep spacing when one was
    given (so the generate stage samples as the trials did)."""
    sampler = settings.get(SAMPLER_PARAM, s.sampler)
    settings = {k: v for k, v in settings.items() if k not in (SAMPLER_PARAM, SPACING_PARAM)}
    settings |= {SAMPLER_PARAM: sampler} if sampler != DEFAULT_SAMPLER else {}
    return settings | ({SPACING_PARAM: s.timestep_spacing} if s.timestep_spacing else {})


def _check(settings):
    """The checks that need the registry and the preset only: (resolved settings, spec, preset)."""
    from Models.diffusion.presets import get_preset

    s = settings.resolved()
    spec, preset = dataset_spec(s), get_preset(s.preset)
    if s.num_imgs < spec.num_classes:
        raise UserError(f"--num_imgs {s.num_imgs} is fewer than {spec.name}'s {spec.num_classes} classes")
    return s, spec, preset


def _storage(s, spec):
    """(storage or None, url): the one asked for, opened; the default SQLite file only when it exists.

    The default file's folder is created by `run` once the checkpoints and the real data are
    found, so a run stopped by bad input leaves no empty experiment folder.
    """
    if s.storage:
        return open_storage(s.storage), s.storage
    url = default_storage_url(s.exp, spec.name)
    return (open_storage(url) if default_storage_path(s.exp, spec.name).is_file() else None), url


def plan(settings, log=print):
    """Checks every setting, opens the storage and finds the checkpoints; writes nothing.

    Every problem is a one-line UserError, raised before TensorFlow's work starts.
    """
    from Pipeline.tuning.results import study_winner
    from Pipeline.tuning.study import tuning_study_name

    s, spec, preset = _check(settings)
    storage, url = _storage(s, spec)
    is_1, ugs_1 = s.is_1, s.ugs_1
    if s.optimize and s.train_model == "dif" and (is_1 is None or ugs_1 is None):
        winner = study_winner(storage, spec.name, s.exp, "enc", s.objective) if storage is not None else None
        if winner is None:
            raise UserError(f"tuning dif needs --is_1 and --ugs_1, or a finished study "
                            f"{tuning_study_name(spec.name, s.exp, 'enc', s.objective)} in the storage")
        is_1 = winner.params[STEPS_PARAM] if is_1 is None else is_1
        ugs_1 = winner.params[UGS_PARAM] if ugs_1 is None else ugs_1
        log(f"study #1's winner: is_1={is_1}, ugs_1={ugs_1:.4g}")

    from Models.diffusion import checkpoints
    from Utils.paths import diffusion_checkpoint_dir

    epochs = checkpoints.available_epochs(s.exp, spec.name, s.train_model)
    if s.train_model == "enc" and not checkpoints.needs_enc_checkpoint(preset, conditioning_spec(s)):
        epochs = [0]  # the text method on a pretrained preset: no enc checkpoint, the published model
    if not epochs:
        raise UserError(f"no {s.train_model} checkpoints in "
                        f"{diffusion_checkpoint_dir(s.exp, spec.name, s.train_model)}: run SD_adapting.py "
                        f"--dataset {spec.name} --train_model {s.train_model} --exp {s.exp} first")
    return TunePlan(settings=s, spec=spec, preset=preset, storage=storage, storage_url=url,
                    protocol=_protocol(s, spec, preset), checkpoint_epochs=list(epochs), is_1=is_1, ugs_1=ugs_1)


def is_done(settings):
    """A reason when the stage-table cell is recorded with these settings' protocol, else None.

    For a study (optimize): the cell must count n_trials finished (complete + pruned)
    trials, and so must the study in the storage.
    """
    from Pipeline.tuning.study import TRIAL_STATES_COUNTED, load_study, tuning_study_name

    s, spec, preset = _check(settings)
    stage, key = s.train_model, s.key
    cell = read_cell(s.exp, spec.name, stage, key)
    if not cell_matches(cell, _protocol(s, spec, preset), s.n_trials if s.optimize else None):
        return None
    if not s.optimize:
        return f"{STAGE_KEYS[stage]}.{key} recorded"
    storage, _ = _storage(s, spec)
    name = tuning_study_name(spec.name, s.exp, stage, s.objective)
    study = load_study(storage, name) if storage is not None else None
    finished = len(study.get_trials(deepcopy=False, states=TRIAL_STATES_COUNTED)) if study is not None else 0
    if finished < s.n_trials:
        return None
    return f"{STAGE_KEYS[stage]}.{key} recorded; study {name} has {finished} finished trials"


def run(settings, log=print, classifier_pool=None):
    """Tunes (or scores the default settings of) one stage; returns the stage-table cell it wrote.

    classifier_pool: a `Models.classifier.ClassifierPool` shared with other stages (default: one
    for this stage's trials, which all train the same kind of classifier).
    """
    p = plan(settings, log=log)
    s = p.settings

    import optuna

    from Models.classifier import ClassifierConfig, ClassifierPool
    from Pipeline.tuning.images import DiffusionImageSource
    from Pipeline.tuning.objective import GenerationObjective
    from Utils.runtime import configure_runtime

    configure_runtime(seed=s.seed, mixed_precision=s.mixed_precision, xla=s.xla)
    # Our own line per trial replaces Optuna's INFO lines.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, stage = p.spec, s.train_model
    source = DiffusionImageSource(s.exp, spec.name, p.preset, stage, enc_epoch=s.enc_epoch,
                                  batch_size=s.generation_batch_size, jit_compile=s.xla, sampler=s.sampler,
                                  conditioning=conditioning_spec(s), timestep_spacing=s.timestep_spacing)
    splits = load_real(s)
    config = ClassifierConfig(epochs=int(s.classifier_epochs), batch_size=int(s.batch_size))
    classifier_pool = classifier_pool if classifier_pool is not None else ClassifierPool()
    if not s.optimize:
        objective = GenerationObjective(source, None, splits, s.num_imgs, config, seed=s.seed,
                                        classifier_pool=classifier_pool)
        return _score_defaults(p, objective, log)

    from Pipeline.tuning.space import build_search_space
    from Pipeline.tuning.storage import open_storage

    space = build_search_space(stage, p.checkpoint_epochs, is_1=p.is_1, ugs_1=p.ugs_1, max_steps=s.max_steps,
                               samplers=s.search_samplers)
    storage = p.storage or open_storage(p.storage_url, create_folder=True)
    objective = GenerationObjective(source, space, splits, s.num_imgs, config, seed=s.seed, objective=s.objective,
                                    classifier_pool=classifier_pool)
    return _tune(p, storage, space, objective, log)


def _score_defaults(p, objective, log):
    """The no_opt cell: the preset's default steps and UGS with the last checkpoint.

    A complete trial of the same settings and protocol in the stage's study (its first
    trial, with enqueue_defaults) already holds these numbers: they are taken from it.
    """
    from Pipeline.tuning.results import as_builtin, record_pipeline, reusable_default_trial
    from Pipeline.tuning.space import default_settings
    from Pipeline.tuning.study import tuning_study_name

    s, spec, stage = p.settings, p.spec, p.settings.train_model
    settings = _with_fixed_choices(default_settings(stage, p.preset, p.checkpoint_epochs), s)
    name = tuning_study_name(spec.name, s.exp, stage, "cas")
    match = {**p.protocol, "dataset": spec.name, "stage": stage, "objective": "cas"}
    if stage == "dif" and s.enc_epoch is not None:
        match["enc_epoch"] = s.enc_epoch
    found = reusable_default_trial(p.storage, name, settings, match)
    if found:
        _, trial = found
        log(f"the default settings {settings} were trial {trial.number} of study {name} "
            f"(same images, seed and classifier protocol): taking its numbers")
        result = {"top1": trial.user_attrs["test_top1"], "top5": trial.user_attrs["test_top5"],
                  "val_accuracy": trial.value, "epochs_run": trial.user_attrs.get("epochs_run"),
                  "settings": settings, "from_trial": {"study": name, "trial": trial.number}}
    else:
        log(f"scoring the default settings {settings} ({s.num_imgs} images, "
            f"{s.classifier_epochs} classifier epochs)")
        result = objective.evaluate(settings)
    entry = {**result, "settings": as_builtin(result["settings"]), **p.protocol,
             "real_data": objective.splits.provenance()}
    record_pipeline(s.exp, spec.name, stage, s.key, entry)
    log(f"no optimisation: validation {entry['val_accuracy']:.4f}, test top-1 {entry['top1']:.4f}, "
        f"top-5 {entry['top5']:.4f}")
    return TuneResult.from_cell(stage, s.key, entry, p.storage_url if p.storage is not None else None)


def _tune(p, storage, space, objective, log):
    """The opt (or opt_kid) cell: runs the study to n_trials and records its winner."""
    from Pipeline.tuning.plots import plots_dir, save_study_plots
    from Pipeline.tuning.results import (DEFAULT_SETTINGS_ATTR, VALIDATION_SIZE_ATTR, as_builtin, best_trial,
                                         record_pipeline, trial_entry)
    from Pipeline.tuning.space import default_settings
    from Pipeline.tuning.storage import redact
    from Pipeline.tuning.study import count_trials, open_study, run_study, tuning_study_name

    s, spec, stage = p.settings, p.spec, p.settings.train_model
    name = tuning_study_name(spec.name, s.exp, stage, s.objective)
    protocol = {**p.protocol, "dataset": spec.name, "stage": stage, "objective": s.objective}
    if stage == "dif":
        protocol.update(is_1=int(p.is_1), ugs_1=float(p.ugs_1), enc_epoch=s.enc_epoch)
    study = open_study(storage, name, objective.direction, s.seed,
                       max_resource=s.classifier_epochs if s.objective == "cas" else None,
                       protocol=protocol, min_resource=s.prune_after)
    if s.enqueue_defaults and not study.get_trials(deepcopy=False):
        first = space.clip(default_settings(stage, p.preset, p.checkpoint_epochs))
        study.enqueue_trial(first)
        study.set_user_attr(DEFAULT_SETTINGS_ATTR, first)
        if s.objective == "cas":
            study.set_user_attr(VALIDATION_SIZE_ATTR, int(len(objective.splits.y_val)))
        log(f"first trial: the default settings {first}")
    log(f"study {name} in {redact(p.storage_url)}: {space.describe()}")
    run_study(study, objective, s.n_trials, log=log, seed=s.seed)
    if s.save_plots:
        saved = save_study_plots(study, plots_dir(s.exp, spec.name, stage, s.objective),
                                 space.checkpoint_param, log=log,
                                 value_label=("KID to the real training images (minimised)" if s.objective == "kid"
                                              else "validation top-1 accuracy (maximised)"))
        if saved:
            log(f"plots: {Path(next(iter(saved.values()))).parent}")
    winner = best_trial(study)
    entry = trial_entry(study, winner, s.objective, space)
    entry.update(settings=_with_fixed_choices(as_builtin(winner.params), s), **p.protocol,
                 real_data=objective.splits.provenance())
    if s.objective == "kid":
        # The KID winner's CAS, with the same classifier protocol as the accuracy-tuned row.
        log(f"KID winner {winner.params}: training a classifier on its images for its CAS")
        result = objective.evaluate(winner.params)
        entry.update(top1=result["top1"], top5=result["top5"], val_accuracy=result["val_accuracy"])
    record_pipeline(s.exp, spec.name, stage, s.key, entry)
    counts = count_trials(study)
    if study.best_trial.number != winner.number:
        log(f"trial {study.best_trial.number} led the default settings by less than one standard error of "
            f"the validation accuracy: the default stays the winner")
    kid = f"KID {entry['kid']:.4g}, " if s.objective == "kid" else ""
    log(f"best of {sum(counts.values())} trial(s) {counts}: trial {winner.number} {as_builtin(winner.params)} "
        f"-> {kid}validation {entry['val_accuracy']:.4f}, test top-1 {entry['top1']:.4f} (recorded, not optimised)")
    return TuneResult.from_cell(stage, s.key, entry, p.storage_url)
