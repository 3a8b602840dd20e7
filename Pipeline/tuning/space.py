"""The search space of a tuning study: inference steps, guidance scale, checkpoint epoch (and a sampler).

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

The Optuna parameter names are generate_dataset.py's flags: `inf_steps`,
`ugs`, `enc_epoch` / `dif_epoch`, and `sampler` when the study also searches
the sampler (hyp_opt.py --search_samplers; off in the paper, which samples with DDIM).

Example:
    >>> space = build_search_space("dif", [1, 2, 3, 4], is_1=30, ugs_1=2.5)
    >>> space.describe()
    'inf_steps int [5, 30], ugs float [0, 5], dif_epoch in {1..4}'
"""

from dataclasses import dataclass

from Models.diffusion.presets import STAGES
from Utils.cli import UserError

# The paper's ranges (PAPER.md stages 2 and 4); dif's upper bounds come from study #1's winner.
PAPER_STEPS = {"enc": (5, 50), "dif": (5, None)}
PAPER_UGS_MAX = 7.5
PAPER_CHECKPOINTS = {"enc": (1, 50), "dif": (1, 10)}
CHECKPOINT_PARAM = {"enc": "enc_epoch", "dif": "dif_epoch"}
STEPS_PARAM, UGS_PARAM, SAMPLER_PARAM = "inf_steps", "ugs", "sampler"
# Not searched: a fixed choice of the study, named in its winner's settings when given.
SPACING_PARAM = "timestep_spacing"


@dataclass(frozen=True)
class SearchSpace:
    """The three settings a trial draws, with their ranges.

    Attributes:
        stage: "enc" or "dif".
        steps: (low, high) inference steps, integers, inclusive.
        ugs: (low, high) unconditional guidance scale, float.
        checkpoint_epochs: the checkpoint epochs offered (sorted, all existing).
        samplers: the samplers a trial chooses among (empty: not searched; the trials use
            the stage's --sampler).

    Example:
        >>> space = build_search_space("dif", [1, 2, 3, 4], is_1=30, ugs_1=2.5)
        >>> space.suggest(trial)         # {'inf_steps': 17, 'ugs': 3.1, 'dif_epoch': 4}
    """

    stage: str
    steps: tuple
    ugs: tuple
    checkpoint_epochs: tuple
    samplers: tuple = ()

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
        if self.samplers:
            settings[SAMPLER_PARAM] = trial.suggest_categorical(SAMPLER_PARAM, list(self.samplers))
        return settings

    def clip(self, settings):
        """`settings` with the steps and UGS moved into the space's ranges (and a searched sampler: the
        first of `samplers` unless it is one of them)."""
        clipped = {**settings,
                   STEPS_PARAM: min(max(settings[STEPS_PARAM], self.steps[0]), self.steps[1]),
                   UGS_PARAM: min(max(settings[UGS_PARAM], self.ugs[0]), self.ugs[1])}
        if self.samplers and clipped.get(SAMPLER_PARAM) not in self.samplers:
            clipped[SAMPLER_PARAM] = self.samplers[0]
        return clipped

    def describe(self):
        """One line for the command line and the report."""
        epochs = self.checkpoint_epochs
        shown = (f"{epochs[0]}..{epochs[-1]}" if _arithmetic_step(epochs) == 1 and len(epochs) > 1
                 else ", ".join(map(str, epochs)))
        samplers = f", {SAMPLER_PARAM} in {{{', '.join(self.samplers)}}}" if self.samplers else ""
        return (f"{STEPS_PARAM} int [{self.steps[0]}, {self.steps[1]}], "
                f"{UGS_PARAM} float [{self.ugs[0]:g}, {self.ugs[1]:g}], "
                f"{self.checkpoint_param} in {{{shown}}}{samplers}")

    def to_dict(self):
        space = {"steps": list(self.steps), "ugs": list(self.ugs),
                 self.checkpoint_param: list(self.checkpoint_epochs)}
        return space | ({SAMPLER_PARAM: list(self.samplers)} if self.samplers else {})


def _arithmetic_step(values):
    """The common difference of a sorted progression (1 for a single value), else None."""
    if len(values) == 1:
        return 1
    steps = {b - a for a, b in zip(values, values[1:])}
    return steps.pop() if len(steps) == 1 else None


def build_search_space(stage, checkpoint_epochs, is_1=None, ugs_1=None, max_steps=None, samplers=None):
    """The paper's search space for `stage`, over the checkpoint epochs that exist.

    Args:
        stage: "enc" or "dif".
        checkpoint_epochs: epochs with a checkpoint of the stage's trained part.
        is_1, ugs_1: study #1's winning steps and UGS (required for "dif").
        max_steps: optional cap of the steps' upper bound (CPU budgets).
        samplers: optional sampler names to search as a categorical (None: not searched).
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
    return SearchSpace(stage, (int(low), int(high)), (float(ugs[0]), float(ugs[1])), epochs,
                       tuple(dict.fromkeys(samplers or ())))


def default_settings(stage, preset, checkpoint_epochs):
    """The no-optimisation settings: the preset's default steps and UGS, the last checkpoint."""
    return {STEPS_PARAM: int(preset.default_inference_steps), UGS_PARAM: float(preset.default_guidance_scale),
            CHECKPOINT_PARAM[stage]: int(max(checkpoint_epochs))}
