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

Each stage runs the script's `main(argv)` in this process (no new Python and
TensorFlow start per stage); the command line it is equivalent to is printed,
recorded in `Experiments/Exp_{exp}/{dataset}/stages.json` and shown in the
report. Every script resumes by itself, so a stage killed half-way continues
where it stopped when `reproduce.py` runs again, and a finished stage is
skipped: its outputs (checkpoints of the last epoch, a study with enough
finished trials and its stage-table cell, a complete generated set, a CAS
entry with the same protocol) are checked before it would run.

Budgets
-------
`quick` (the default) fits `digits` + `small` into 10 minutes on a 2-core
CPU: two trials per study, a few hundred images per trial, short classifier
training, x1..x2. `paper` is the paper's run: 50 + 40 trials of 4,000 images, the CAS
protocol's 100 epochs per classifier, x1..x10 (for `--preset sd1` on a GPU).
Diffusion training epochs are the preset's (`Models/diffusion/presets.py`)
unless a budget or flag says otherwise.

Example:
    >>> pipeline = Pipeline(dataset="digits", preset="small", budget=BUDGETS["quick"], exp=0)
    >>> pipeline.run()          # prints "[3/11] tune_enc: ..." per stage, writes REPORT.md
"""

import datetime
import gc
import importlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from Pipeline import tuning
from Pipeline.report import python_command, write_report
from Utils.cli import UserError
from Utils.io import merge_json, read_json
from Utils.paths import experiment_dir, output_root, pipeline_results_json, synthetic_dir

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
    generation_batch_size: int = 250
    prune_after: object = 1
    enqueue_defaults: bool = False
    grid_freq: int = 1


# The embedded default run (`python reproduce.py`): scikit-learn's digits, no download, the
# from-scratch generator; it fits in 10 minutes of an idle 2-core CPU (BENCHMARKS.md).
DEFAULT_PRESET = "small"

BUDGETS = {
    # digits + small in under 10 minutes on 2 CPU cores (BENCHMARKS.md). Two trials per study: the
    # default settings and one more, which displaces them only by more than the validation
    # accuracy's standard error (Pipeline/tuning.py, best_trial).
    "quick": Budget("quick", enc_epochs=None, dif_epochs=None, n_trials_enc=2, n_trials_dif=2,
                    num_imgs=250, tuning_classifier_epochs=4, classifier_epochs=8,
                    classifier_batch_size=64, max_multiple=2, max_steps="preset", prune_after="half",
                    enqueue_defaults=True, grid_freq=10),
    # PAPER.md: 50 / 40 trials of 4,000 images, the CAS protocol (100 epochs, batch 256), x1..x10.
    "paper": Budget("paper", enc_epochs=None, dif_epochs=None, n_trials_enc=50, n_trials_dif=40,
                    num_imgs=4000, tuning_classifier_epochs=100, classifier_epochs=100,
                    classifier_batch_size=256, max_multiple=10, max_steps=None),
}


@dataclass
class Stage:
    """One step of the pipeline: a script's argv, and how to tell it is already done."""

    name: str
    title: str
    script: str
    argv: object      # callable() -> list of str (computed when the stage runs: it may need earlier results)
    done: object      # callable() -> str reason when the outputs exist, else None


def read_stage_log(exp, dataset):
    return read_json(experiment_dir(exp, dataset) / STAGE_LOG_FILE, default={}) or {}


class Pipeline:
    """The chained stages for one dataset and preset (see the module docstring).

    Args:
        dataset, preset, exp, seed, data_dir: as the scripts' flags.
        budget: a `Budget`.
        storage: Optuna storage URL for both studies (None: the default SQLite file).
        runtime_argv: GPU flags passed on to the training and generation scripts
            (e.g. ["--mixed_precision", "bfloat16", "--xla"]).
        quality: add the quality-metrics stage (evaluate_dataset.py, ResNet20 features)
            before the report.
        command: the reproduce.py command line, for the report.
        log: where progress lines go.
    """

    def __init__(self, dataset, preset, budget, exp=0, seed=0, data_dir=None, storage=None,
                 runtime_argv=(), command="python reproduce.py", log=print, quality=False):
        from Data.registry import get_spec
        from Models.diffusion.presets import get_preset

        self.spec = get_spec(dataset)
        self.dataset = self.spec.name
        self.preset = get_preset(preset)
        self.budget = budget
        self.exp, self.seed, self.data_dir, self.storage = exp, seed, data_dir, storage
        self.runtime_argv = list(runtime_argv)
        self.quality = bool(quality)
        self.command = command
        self.log = log
        self.enc_epochs = budget.enc_epochs or self.preset.enc_epochs
        self.dif_epochs = budget.dif_epochs or self.preset.dif_epochs
        self.max_steps = (self.preset.default_inference_steps if budget.max_steps == "preset"
                          else budget.max_steps)
        self._train_size = None

    # ----- facts the stages need -------------------------------------------------------
    def common(self, reads_real_data=True):
        argv = ["--dataset", self.dataset, "--exp", str(self.exp), "--preset", self.preset.name,
                "--seed", str(self.seed)]
        # generate_dataset.py needs only the registry, not the real images: no --data_dir.
        return argv + (["--data_dir", str(self.data_dir)] if self.data_dir and reads_real_data else [])

    def train_size(self):
        if self._train_size is None:
            from Data.loaders import load_dataset

            self._train_size = len(load_dataset(self.dataset, data_dir=self.data_dir).y_train)
        return self._train_size

    def pipeline_cell(self, stage, key):
        table = read_json(pipeline_results_json(self.exp), default={}) or {}
        return table.get(self.dataset, {}).get(tuning.STAGE_KEYS[stage], {}).get(key)

    def winner(self, stage):
        """Settings of study `stage`'s winner, from the stage table."""
        cell = self.pipeline_cell(stage, "opt")
        if not cell:
            raise UserError(f"no tuned settings for {stage} in {pipeline_results_json(self.exp)}; "
                            f"run the tune_{stage} stage first")
        return cell["settings"]

    def tuning_protocol(self):
        return {"num_imgs": self.budget.num_imgs, "classifier_epochs": self.budget.tuning_classifier_epochs,
                "classifier_batch_size": self.budget.classifier_batch_size, "seed": self.seed,
                "preset": self.preset.name}

    def checkpoints_done(self, stage, epochs):
        from Models.diffusion import checkpoints

        have = checkpoints.available_epochs(self.exp, self.dataset, stage)
        return f"checkpoint of epoch {epochs} exists" if epochs in have else None

    def cell_done(self, stage, key, n_trials=None):
        cell = self.pipeline_cell(stage, key)
        if not cell:
            return None
        if any(cell.get(k) != v for k, v in self.tuning_protocol().items()):
            return None
        if n_trials is not None:
            trials = cell.get("trials", {})
            if trials.get("COMPLETE", 0) + trials.get("PRUNED", 0) < n_trials:
                return None
        return f"{tuning.STAGE_KEYS[stage]}.{key} recorded"

    def cas_done(self, key):
        from Metrics.cas import load_cas

        entry = load_cas(self.exp, self.dataset).get(key)
        if entry and entry.get("max_epochs") == self.budget.classifier_epochs \
                and entry.get("batch_size") == self.budget.classifier_batch_size and entry.get("seed") == self.seed:
            return f"CAS {key} recorded (top-1 {entry['top1']:.4f})"
        return None

    def generation_target(self):
        """Images to generate: max_multiple x the training set, rounded up to a multiple of the classes.

        generate_dataset.py gives the remainder of img_total / C to the first classes, while
        classifier_training.py's balanced `--take` gives it to seeded random classes: with
        every class holding ceil(max_multiple * N / C) images, any take of k x N (k <= max_multiple)
        finds enough images in every class.
        """
        classes = self.spec.num_classes
        return classes * math.ceil(self.budget.max_multiple * self.train_size() / classes)

    def generation_done(self):
        manifest = read_json(synthetic_dir(self.exp, self.dataset) / "manifest.json", default=None)
        if not manifest:
            return None
        complete = manifest.get("complete", manifest.get("done"))
        total = manifest.get("img_total", manifest.get("settings", {}).get("img_total"))
        if complete and total == self.generation_target():
            return f"{total} images generated"
        return None

    # ----- the stages ------------------------------------------------------------------
    def tune_argv(self, stage, optimize):
        b = self.budget
        argv = ["--train_model", stage, *self.common(), "--num_imgs", str(b.num_imgs),
                "--classifier_epochs", str(b.tuning_classifier_epochs),
                "--classifier_batch_size", str(b.classifier_batch_size),
                "--batch_size", str(b.generation_batch_size)]
        if stage == "dif":
            argv += ["--enc_epoch", str(self.winner("enc")["enc_epoch"])]
        # Mixed precision and XLA speed up the trials' sampling; several GPUs serve several
        # workers on one study instead (hyp_opt.py refuses --multi_gpu).
        argv += [flag for flag in self.runtime_argv if flag != "--multi_gpu"]
        if not optimize:
            return argv + ["--no-optimize"]
        argv += ["--n_trials", str(b.n_trials_enc if stage == "enc" else b.n_trials_dif), "--save_plots"]
        prune_after = max(1, b.tuning_classifier_epochs // 2) if b.prune_after == "half" else int(b.prune_after)
        if prune_after != 1:
            argv += ["--prune_after", str(prune_after)]
        if b.enqueue_defaults:
            argv.append("--enqueue_defaults")
        if self.max_steps:
            argv += ["--max_steps", str(self.max_steps)]
        if self.storage:
            argv += ["--storage", self.storage]
        return argv

    def stages(self):
        b = self.budget
        runtime = self.runtime_argv
        stages = [
            Stage("enc", "class encoder", "SD_adapting.py",
                  lambda: ["--train_model", "enc", *self.common(), "--epochs", str(self.enc_epochs),
                           "--freq", "1", "--grid_freq", str(b.grid_freq), *runtime],
                  lambda: self.checkpoints_done("enc", self.enc_epochs)),
            Stage("tune_enc", "tuning #1 (class-encoder checkpoint, steps, UGS)", "hyp_opt.py",
                  lambda: self.tune_argv("enc", optimize=True),
                  lambda: self.cell_done("enc", "opt", b.n_trials_enc)),
            Stage("enc_default", "stage table, class encoder, default settings", "hyp_opt.py",
                  lambda: self.tune_argv("enc", optimize=False),
                  lambda: self.cell_done("enc", "no_opt")),
            Stage("dif", "UNet fine-tuning", "SD_adapting.py",
                  lambda: ["--train_model", "dif", *self.common(), "--enc_epoch",
                           str(self.winner("enc")["enc_epoch"]), "--epochs", str(self.dif_epochs),
                           "--freq", "1", "--grid_freq", str(b.grid_freq), *runtime],
                  lambda: self.checkpoints_done("dif", self.dif_epochs)),
            Stage("tune_dif", "tuning #2 (UNet checkpoint, steps, UGS)", "hyp_opt.py",
                  lambda: self.tune_argv("dif", optimize=True),
                  lambda: self.cell_done("dif", "opt", b.n_trials_dif)),
            Stage("dif_default", "stage table, fine-tuned UNet, default settings", "hyp_opt.py",
                  lambda: self.tune_argv("dif", optimize=False),
                  lambda: self.cell_done("dif", "no_opt")),
            Stage("generate", f"generation of x{b.max_multiple} the real training set", "generate_dataset.py",
                  self.generate_argv, self.generation_done),
            Stage("cas_real", "CAS of the real training set", "classifier_training.py",
                  lambda: ["--dataset", self.dataset, "--exp", str(self.exp), *self.cas_common()],
                  lambda: self.cas_done("real")),
        ]
        for k in range(1, b.max_multiple + 1):
            stages.append(Stage(
                f"cas_x{k}", f"CAS of x{k} synthetic", "classifier_training.py",
                lambda k=k: ["--dataset", self.dataset, "--exp", str(self.exp), "--synthetic", "--take", str(k),
                             *self.cas_common()],
                lambda k=k: self.cas_done(f"x{k}")))
        if self.quality:
            stages.append(Stage(
                "quality", "quality metrics of the generated set (ResNet20 features)", "evaluate_dataset.py",
                lambda: ["--dataset", self.dataset, "--synthetic_dir", str(synthetic_dir(self.exp, self.dataset)),
                         "--exp", str(self.exp), "--features", "resnet20", "--seed", str(self.seed),
                         *(["--data_dir", str(self.data_dir)] if self.data_dir else [])],
                self.quality_done))
        return stages

    def quality_done(self):
        from Metrics.quality import folder_key
        from Utils.paths import quality_results_json

        table = read_json(quality_results_json(self.exp), default={}) or {}
        entry = table.get(self.dataset, {}).get(folder_key(synthetic_dir(self.exp, self.dataset)), {})
        return "quality metrics recorded" if "resnet20" in entry else None

    def cas_common(self):
        argv = ["--epochs", str(self.budget.classifier_epochs), "--batch_size", str(self.budget.classifier_batch_size),
                "--seed", str(self.seed), *self.runtime_argv]
        return argv + (["--data_dir", str(self.data_dir)] if self.data_dir else [])

    def generate_argv(self):
        enc, dif = self.winner("enc"), self.winner("dif")
        return ["--img_total", str(self.generation_target()), *self.common(reads_real_data=False),
                "--enc_epoch", str(enc["enc_epoch"]), "--dif_epoch", str(dif["dif_epoch"]),
                "--inf_steps", str(dif["inf_steps"]), "--ugs", str(dif["ugs"]),
                "--batch_size", str(self.budget.generation_batch_size), *self.runtime_argv]

    # ----- running ---------------------------------------------------------------------
    def record(self, stage, **entry):
        merge_json(experiment_dir(self.exp, self.dataset) / STAGE_LOG_FILE, {stage.name: entry})

    def run_stage(self, stage, index, total):
        reason = stage.done()
        prefix = f"[{index}/{total}] {stage.name}: {stage.title}"
        if reason:
            self.log(f"{prefix}: skipped ({reason})")
            entry = read_stage_log(self.exp, self.dataset).get(stage.name, {})
            if entry.get("status") != "done":
                self.record(stage, status="done", command=None)
            return 0.0
        argv = stage.argv()
        command = python_command([stage.script, *argv])
        self.log(f"{prefix}: running\n    {command}")
        self.record(stage, status="running", command=command, started=_now())
        started = time.perf_counter()
        module = importlib.import_module(Path(stage.script).stem)
        status = module.main(argv)
        seconds = time.perf_counter() - started
        if status:
            raise UserError(f"stage {stage.name} failed (exit status {status}): {command}")
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
                            data_dir=self.data_dir, manifest=manifest,
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


