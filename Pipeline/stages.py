"""The whole pipeline, stage by stage, each skipped when its outputs exist (`reproduce.py`).

    1 enc          SD_adapting.py --train_model enc             class encoder (tiny, small: + UNet from scratch)
    2 tune_enc     hyp_opt.py --train_model enc                 Bayesian optimisation #1
    3 enc_default  hyp_opt.py --train_model enc --no-optimize   stage table: after the encoder, defaults
    4 dif          SD_adapting.py --train_model dif             UNet fine-tuning, #1's class encoder frozen
    5 tune_dif     hyp_opt.py --train_model dif                 Bayesian optimisation #2
    6 dif_default  hyp_opt.py --train_model dif --no-optimize   stage table: after fine-tuning, defaults
    7 generate     generate_dataset.py                          xN_max x the real training set, #2's settings
    8 cas_real, cas_x1..cas_xN   classifier_training.py         CAS of real data and of each multiple
      quality      evaluate_dataset.py                          with --quality: FID, KID, PRDC, memorisation
    9 report       REPORT.md                                    always rewritten

The no-optimisation rows come after the studies: with `enqueue_defaults` (the
quick budget) a study's first trial IS the default settings, and the no-opt
stage takes that trial's numbers instead of computing them again.

Each stage is a library function called in this process (`Pipeline/adapt.py`,
`tune.py`, `generate.py`, `cas.py`, `evaluate.py`: one frozen settings object
in, a result out; no new Python and TensorFlow start per stage). The settings
object gives the stage's command line (`to_argv`), which is printed,
recorded in `Experiments/Exp_{exp}/{dataset}/stages.json` and shown in the
report: what a user can paste to rerun that stage alone. Every script resumes by itself, so a stage killed half-way continues
where it stopped when `reproduce.py` runs again, and a finished stage is
skipped: its outputs (checkpoints of the last epoch, a study with enough
finished trials and its stage-table cell, a complete generated set, a CAS
entry with the same protocol) are checked before it would run.

Budgets
-------
`quick` (the default) is sized for `digits` + `small` in 10 minutes on a 2-core
CPU (the measured times: BENCHMARKS.md, "The README's main command today"): two
trials per study, a few hundred images per trial, short classifier training,
x1 only. `paper` is the paper's run: 50 + 40 trials of 4,000 images, the CAS
protocol's 100 epochs per classifier, x1..x10 (for `--preset sd1` on a GPU).
Diffusion training epochs are the preset's (`Models/diffusion/presets.py`)
unless a budget or flag says otherwise.

Example:
    >>> pipeline = Pipeline(dataset="digits", preset="small", budget=BUDGETS["quick"], exp="0")
    >>> pipeline.run()          # prints "[3/11] tune_enc: ..." per stage, writes REPORT.md
"""

import dataclasses
import datetime
import functools
import gc
import time
from dataclasses import dataclass, replace

from Models.diffusion.presets import GENERATION_BATCH_SIZE
from Models.diffusion.schedulers import DEFAULT_SAMPLER
from Pipeline import adapt, cas, evaluate, generate, tune, tuning
from Pipeline.report import write_report
from Pipeline.tuning.space import SAMPLER_PARAM, SPACING_PARAM
from Utils.cli import UserError
from Utils.io import merge_json, read_json
from Utils.paths import experiment_dir, output_root, synthetic_dir
from Utils.runtime import RuntimeSettings

STAGE_LOG_FILE = "stages.json"


@dataclass(frozen=True)
class Budget:
    """How much of everything a pipeline run does.

    Attributes:
        name: "quick" or "paper".
        enc_epochs, dif_epochs: diffusion training epochs (None: the preset's).
        n_trials_enc, n_trials_dif: total finished trials of studies #1 and #2.
        num_imgs: generated images per trial.
        tuning_classifier_epochs: ResNet20 epochs per trial (and for the no-opt rows).
        classifier_epochs: ResNet20 epochs of each CAS run.
        classifier_batch_size: ResNet20 batch, tuning and CAS.
        max_multiple: the CAS runs x1..x{max_multiple}; that many times the real training set is generated.
        max_steps: cap of the inference-steps search range (None: the paper's; "preset": the
            preset's default steps).
        generation_batch_size: images per sampler call.
        prune_after: Hyperband's minimum resource in epochs (1: Optuna's default, the paper's
            configuration; "half": half the tuning classifier's epochs, for short noisy runs).
        enqueue_defaults: each study's first trial is the default settings (hyp_opt.py
            --enqueue_defaults), so with a handful of trials the winner is never worse than
            no optimisation on validation.
        grid_freq: epochs between the sample grids drawn with the diffusion checkpoints
            (SD_adapting.py --grid_freq; the last epoch always gets one).
    """

    name: str
    enc_epochs: object
    dif_epochs: object
    n_trials_enc: int
    n_trials_dif: int
    num_imgs: int
    tuning_classifier_epochs: int
    classifier_epochs: int
    classifier_batch_size: int
    max_multiple: int
    max_steps: object
    generation_batch_size: int = GENERATION_BATCH_SIZE
    prune_after: object = 1
    enqueue_defaults: bool = False
    grid_freq: int = 1


# The embedded default run (`python reproduce.py`): scikit-learn's digits, no download, the
# from-scratch generator; sized for 10 minutes of an idle 2-core CPU (BENCHMARKS.md).
DEFAULT_PRESET = "small"

BUDGETS = {
    # digits + small sized for 10 minutes on 2 CPU cores (BENCHMARKS.md). Two trials per study: the
    # default settings and one more, which displaces them only by more than the validation
    # accuracy's standard error (Pipeline/tuning.py, best_trial).
    "quick": Budget("quick", enc_epochs=None, dif_epochs=None, n_trials_enc=2, n_trials_dif=2,
                    num_imgs=250, tuning_classifier_epochs=4, classifier_epochs=8,
                    classifier_batch_size=64, max_multiple=1, max_steps="preset", prune_after="half",
                    enqueue_defaults=True, grid_freq=10),
    # PAPER.md: 50 / 40 trials of 4,000 images, the CAS protocol (100 epochs, batch 256), x1..x10.
    "paper": Budget("paper", enc_epochs=None, dif_epochs=None, n_trials_enc=50, n_trials_dif=40,
                    num_imgs=4000, tuning_classifier_epochs=100, classifier_epochs=100,
                    classifier_batch_size=256, max_multiple=10, max_steps=None),
}


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a stage module (SCRIPT, is_done, run) and the settings it runs with."""

    name: str
    title: str
    module: object
    settings: object  # callable() -> the stage's settings (computed when it runs: it may need earlier results)
    trains_classifiers: bool = False  # its run() takes the pipeline's `classifier_pool`

    @property
    def script(self):
        return self.module.SCRIPT


def read_stage_log(exp, dataset):
    return read_json(experiment_dir(exp, dataset) / STAGE_LOG_FILE, default={}) or {}


class Pipeline:
    """The chained stages for one dataset and preset (see the module docstring).

    Args:
        dataset, preset, exp, seed, data_dir, image_size, accept_unverified_data, train_subset,
            train_subset_seed: as the scripts' flags.
        budget: a `Budget`.
        storage: Optuna storage URL for both studies (None: the default SQLite file).
        runtime: `RuntimeSettings` (GPU flags) for the training, generation and classifier stages.
        quality: add the quality-metrics stage (evaluate_dataset.py, ResNet20 features)
            before the report.
        sampler: the studies' sampler (hyp_opt.py --sampler; DDIM, the paper's).
        search_samplers: samplers the studies also search (hyp_opt.py --search_samplers; None: not searched).
            The generate stage samples with study #2's winner's sampler.
        timestep_spacing: the sampling timesteps' spacing of the studies and the generation
            (hyp_opt.py / generate_dataset.py --timestep_spacing; None: the checkpoints').
        unet_tuning: the dif stage's {unet_tuning, lora_rank, lora_alpha} (SD_adapting.py's flags;
            None or unet_tuning "full": the paper's full fine-tuning, its command line unchanged).
        command: the reproduce.py command line, for the report.
        log: where progress lines go.
    """

    def __init__(self, dataset, preset, budget, exp="0", seed=0, data_dir=None, storage=None,
                 runtime=RuntimeSettings(), command="python reproduce.py", log=print, quality=False,
                 image_size=None, accept_unverified_data=False, sampler=DEFAULT_SAMPLER, search_samplers=None,
                 train_subset=None, train_subset_seed=0, conditioning="class_encoder", prompt_template=None,
                 ti_tokens=1, unet_tuning=None, timestep_spacing=None):
        from Data.registry import get_spec
        from Models.diffusion.presets import get_preset

        self.spec = get_spec(dataset, image_size=image_size, data_dir=data_dir)
        self.dataset = self.spec.name
        self.image_size, self.accept_unverified_data = image_size, bool(accept_unverified_data)
        self.train_subset, self.train_subset_seed = train_subset, int(train_subset_seed)
        self.preset = get_preset(preset)
        self.budget = budget
        self.exp, self.seed, self.data_dir, self.storage = str(exp), seed, data_dir, storage
        self.runtime = runtime
        self.quality = bool(quality)
        self.sampler = sampler
        self.timestep_spacing = timestep_spacing
        # The conditioning method's flags, passed to every stage that has them (non-default only).
        self.conditioning = {key: value for key, value in (("conditioning", conditioning),
                             ("prompt_template", prompt_template), ("ti_tokens", ti_tokens))
                             if value not in (None, "class_encoder", 1)}
        self.search_samplers = tuple(search_samplers) if search_samplers else None
        # Only what differs from the defaults is passed on, so the paper's dif command stays the paper's.
        defaults = {f.name: f.default for f in dataclasses.fields(adapt.AdaptSettings)}
        self.unet_tuning = {key: value for key, value in (unet_tuning or {}).items() if value != defaults[key]}
        self.command = command
        self.log = log
        self.enc_epochs = budget.enc_epochs or self.preset.enc_epochs
        self.dif_epochs = budget.dif_epochs or self.preset.dif_epochs
        self.max_steps = (self.preset.default_inference_steps if budget.max_steps == "preset"
                          else budget.max_steps)
        self._train_size = None

    # ----- facts the stages need -------------------------------------------------------
    def common(self, settings_class, reads_real_data=True):
        """The shared settings (dataset, exp, preset, seed, data_dir) that `settings_class` has."""
        common = dict(dataset=self.dataset, exp=self.exp, preset=self.preset.name, seed=self.seed)
        if self.data_dir and reads_real_data:
            common["data_dir"] = str(self.data_dir)
        if self.image_size:
            common["image_size"] = self.image_size
        if self.accept_unverified_data and reads_real_data:
            common["accept_unverified_data"] = True
        if self.train_subset:
            # Also where no real data is read: x1 (generation, --take) means the subset's size.
            common.update(train_subset=self.train_subset, train_subset_seed=self.train_subset_seed)
        common.update(self.conditioning)
        fields = {f.name for f in dataclasses.fields(settings_class)}
        return {key: value for key, value in common.items() if key in fields}

    def runtime_settings(self, multi_gpu=True):
        runtime = self.runtime.as_dict()
        return runtime if multi_gpu else runtime | {"multi_gpu": False}

    def train_size(self):
        if self._train_size is None:
            self._train_size = len(self.real_splits().y_train)
        return self._train_size

    def real_splits(self):
        from Data.loaders import load_dataset

        return load_dataset(self.dataset, data_dir=self.data_dir, image_size=self.image_size,
                            accept_unverified=self.accept_unverified_data, train_subset=self.train_subset,
                            train_subset_seed=self.train_subset_seed)

    def winner(self, stage):
        """Settings of study `stage`'s winner, from the stage table."""
        return tune.winner_settings(self.exp, self.dataset, stage)

    def generation_target(self):
        """Images to generate: max_multiple x the training set (every take x1..xN finds its classes
        full, since generation and subsets share Data/balance.py's rule)."""
        return self.budget.max_multiple * self.train_size()

    # ----- the stages' settings ----------------------------------------------------------
    def adapt_settings(self, stage):
        b = self.budget
        extra = dict(enc_epoch=self.winner("enc")["enc_epoch"], **self.unet_tuning) if stage == "dif" else {}
        return adapt.AdaptSettings(train_model=stage, **self.common(adapt.AdaptSettings), **extra,
                                   epochs=self.enc_epochs if stage == "enc" else self.dif_epochs,
                                   freq=1, grid_freq=b.grid_freq, **self.runtime_settings())

    def tune_settings(self, stage, optimize):
        b = self.budget
        extra = dict(enc_epoch=self.winner("enc")["enc_epoch"]) if stage == "dif" else {}
        if optimize:
            extra |= dict(n_trials=b.n_trials_enc if stage == "enc" else b.n_trials_dif, save_plots=True,
                          enqueue_defaults=b.enqueue_defaults, max_steps=self.max_steps, storage=self.storage,
                          prune_after=(max(1, b.tuning_classifier_epochs // 2) if b.prune_after == "half"
                                       else int(b.prune_after)))
        # Several GPUs serve several workers on one study instead (hyp_opt.py refuses --multi_gpu).
        if optimize and self.search_samplers:
            extra |= dict(search_samplers=self.search_samplers)
        return tune.TuneSettings(train_model=stage, optimize=optimize, **self.common(tune.TuneSettings), **extra,
                                 sampler=self.sampler, timestep_spacing=self.timestep_spacing,
                                 num_imgs=b.num_imgs, classifier_epochs=b.tuning_classifier_epochs,
                                 batch_size=b.classifier_batch_size,
                                 generation_batch_size=b.generation_batch_size,
                                 **self.runtime_settings(multi_gpu=False))

    def generate_settings(self):
        enc, dif = self.winner("enc"), self.winner("dif")
        return generate.GenerateSettings(img_total=self.generation_target(), **self.common(generate.GenerateSettings, reads_real_data=False),
                                         enc_epoch=enc["enc_epoch"], dif_epoch=dif["dif_epoch"],
                                         inf_steps=dif["inf_steps"], ugs=dif["ugs"],
                                         sampler=dif.get(SAMPLER_PARAM, DEFAULT_SAMPLER),
                                         timestep_spacing=dif.get(SPACING_PARAM),
                                         batch_size=self.budget.generation_batch_size, **self.runtime_settings())

    def cas_settings(self, take=None):
        b = self.budget
        synthetic = dict(synthetic=True, take=take) if take else dict(synthetic=False)
        return cas.CASSettings(**self.common(cas.CASSettings), **synthetic, epochs=b.classifier_epochs,
                               batch_size=b.classifier_batch_size, **self.runtime_settings())

    def evaluate_settings(self):
        return evaluate.EvaluateSettings(**self.common(evaluate.EvaluateSettings), synthetic_dir=str(synthetic_dir(self.exp, self.dataset)),
                                         features="resnet20")

    def stages(self):
        b = self.budget
        stages = [
            Stage("enc", "class encoder", adapt, lambda: self.adapt_settings("enc")),
            Stage("tune_enc", "tuning #1 (class-encoder checkpoint, steps, UGS)", tune,
                  lambda: self.tune_settings("enc", optimize=True), trains_classifiers=True),
            Stage("enc_default", "stage table, class encoder, default settings", tune,
                  lambda: self.tune_settings("enc", optimize=False), trains_classifiers=True),
            Stage("dif", "UNet fine-tuning", adapt, lambda: self.adapt_settings("dif")),
            Stage("tune_dif", "tuning #2 (UNet checkpoint, steps, UGS)", tune,
                  lambda: self.tune_settings("dif", optimize=True), trains_classifiers=True),
            Stage("dif_default", "stage table, fine-tuned UNet, default settings", tune,
                  lambda: self.tune_settings("dif", optimize=False), trains_classifiers=True),
            Stage("generate", f"generation of x{b.max_multiple} the real training set", generate,
                  self.generate_settings),
            Stage("cas_real", "CAS of the real training set", cas, self.cas_settings, trains_classifiers=True),
        ]
        stages += [Stage(f"cas_x{k}", f"CAS of x{k} synthetic", cas, lambda k=k: self.cas_settings(take=k),
                         trains_classifiers=True)
                   for k in range(1, b.max_multiple + 1)]
        if self.quality:
            stages.append(Stage("quality", "quality metrics of the generated set (ResNet20 features)", evaluate,
                                self.evaluate_settings))
        return stages

    # ----- running ---------------------------------------------------------------------
    @functools.cached_property
    def classifier_pool(self):
        """One compiled ResNet20 per kind for all the stages' classifiers: each saves a new model's trace."""
        from Models.classifier import ClassifierPool

        return ClassifierPool()

    def record(self, stage, **entry):
        merge_json(experiment_dir(self.exp, self.dataset) / STAGE_LOG_FILE, {stage.name: entry})

    def run_stage(self, stage, index, total):
        settings = stage.settings()
        reason = stage.module.is_done(settings)
        prefix = f"[{index}/{total}] {stage.name}: {stage.title}"
        if reason:
            self.log(f"{prefix}: skipped ({reason})")
            entry = read_stage_log(self.exp, self.dataset).get(stage.name, {})
            if entry.get("status") != "done":
                self.record(stage, status="done", command=None)
            return 0.0
        command = settings.command(stage.script)
        self.log(f"{prefix}: running\n    {command}")
        self.record(stage, status="running", command=command, started=_now())
        started = time.perf_counter()
        stage.module.run(settings, **({"classifier_pool": self.classifier_pool} if stage.trains_classifiers else {}))
        seconds = time.perf_counter() - started
        self.record(stage, status="done", command=command, seconds=round(seconds, 1), finished=_now())
        self.log(f"{prefix}: done in {seconds:.0f} s")
        _release_memory()
        return seconds

    def run(self, stop_after=None):
        """Runs every stage not yet done (through `stop_after`, a stage name), then the report."""
        stages = self.stages()
        names = [s.name for s in stages]
        if stop_after is not None and stop_after not in names:
            raise UserError(f"--stop_after {stop_after!r} is not a stage; stages: {', '.join(names)}")
        if self.storage:
            tuning.open_storage(self.storage)  # a bad URL fails now, not after an hour of training
        total = len(stages) + 1
        started = time.perf_counter()
        self.log(f"pipeline {self.dataset} / {self.preset.name} / budget {self.budget.name} / Exp {self.exp}: "
                 f"{total} stages, outputs under {output_root().resolve()}")
        for index, stage in enumerate(stages, 1):
            self.run_stage(stage, index, total)
            if stage.name == stop_after:
                self.log(f"stopping after {stop_after} as asked")
                return None
        self.log(f"[{total}/{total}] report")
        manifest = read_json(synthetic_dir(self.exp, self.dataset) / "manifest.json", default=None)
        path = write_report(self.exp, self.dataset, self.preset.name, self.budget.name,
                            read_stage_log(self.exp, self.dataset), self.command,
                            storage_url=self.storage or tuning.default_storage_url(self.exp, self.dataset),
                            splits=self.real_splits(), manifest=manifest,
                            wall_seconds=time.perf_counter() - started)
        self.log(f"report: {path}")
        return path


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _release_memory():
    """Drops the finished stage's models before the next one builds its own."""
    import keras

    keras.backend.clear_session()
    gc.collect()


def budget_with(budget, **overrides):
    """The budget with the given fields replaced (None values ignored)."""
    return replace(budget, **{k: v for k, v in overrides.items() if v is not None})


