"""The generation stage (PAPER.md stage 5): a synthetic data set from the trained class-conditional model.

`run(GenerateSettings(...))` writes Data/Synthetic/Exp_{exp}/{dataset}/class_{NN}/img_{n}.png
(or `out_dir`) through `Data.synthetic_writer.SyntheticWriter`: balanced over
classes (`Data.balance.per_class_counts`), at the dataset's native resolution,
plus manifest.json and samples.png. Image n of class c depends only on
(seed, c, n) and the model settings: batch sizes, shards and interrupted runs
give identical files; a killed run continues where it stopped.

How many images: `img_class` per class (the paper's flag), or `img_total` in all,
or, with neither, as many as the real training split (x1; that needs the real
data). The checkpoints and sampler settings default to the preset's
(`Models/diffusion/presets.py`: enc_epochs, dif_epochs, default_inference_steps,
default_guidance_scale; sd1/sd2: the paper's 50, 10, 50, 7.5); `dif_epoch` 0 is
the UNet without fine-tuning. `only_class` and `shard` make one part of the data
set; `verify` checks that parts make exactly one data set (`Data.shards`).

Example:
    >>> settings = GenerateSettings(dataset="digits", preset="small", img_total=1077, enc_epoch=25, dif_epoch=1)
    >>> is_done(settings) or run(settings)
    GenerateResult(out_dir=PosixPath('Data/Synthetic/Exp_0/digits'), img_total=1077, complete=True, ...)
    >>> settings.resolved().command(SCRIPT)
    'python generate_dataset.py --dataset digits --img_total 1077 --enc_epoch 25 ...'
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from Data.balance import per_class_counts
from Data.shards import parse_shard, shard_from_environment
from Utils.cli import UserError, existing_folder, folder, non_negative_float, non_negative_int, positive_int
from Pipeline.common_settings import (accept_unverified_setting, conditioning_setting, conditioning_spec,
                                      data_dir_setting, dataset_setting, dataset_spec, experiment_setting,
                                      image_size_setting, load_real, preset_setting, prompt_template_setting,
                                      sampler_setting, ti_tokens_setting, timestep_spacing_setting,
                                      train_subset_seed_setting, train_subset_setting)
from Models.diffusion.presets import GENERATION_BATCH_SIZE
from Models.diffusion.schedulers import DDIM
from Utils.runtime import RuntimeSettings
from Utils.settings import PAPER, setting

SCRIPT = "generate_dataset.py"
# Images per sampler call (the paper's); it does not change the images.
# The manifest's settings that come straight from the flags (the others follow from the checkpoints).
_FLAG_KEYS = ("dataset", "preset", "img_total", "exp", "enc_epoch", "dif_epoch", "inf_steps", "ugs", "eta",
              "seed", "mixed_precision", "sampler", "conditioning")
# What a manifest without the key was made with (written before the key existed).
_MANIFEST_DEFAULTS = {"sampler": DDIM.name, "conditioning": "class_encoder"}


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(RuntimeSettings):
    """Every flag of generate_dataset.py (`resolved()` fills in the preset's and the data's defaults)."""

    dataset: str = dataset_setting()
    img_class: int = setting(None, type=positive_int, group=PAPER,
                             help="images per class (the paper's); or --img_total; neither: as many as the "
                                  "real training split (x1, needs the real data)")
    img_total: int = setting(None, type=positive_int, group=PAPER,
                             help="images in the whole data set, balanced over classes (img_total // C per "
                                  "class, one more for the first img_total %% C classes); or --img_class")
    batch_size: int = setting(GENERATION_BATCH_SIZE, type=positive_int, group=PAPER,
                              help="images per sampler call (the paper's 250; does not change the images)")
    enc_epoch: int = setting(None, type=positive_int, group=PAPER,
                             help="the class-encoder checkpoint (default: the preset's enc epochs, sd: 50)")
    dif_epoch: int = setting(None, type=non_negative_int, group=PAPER,
                             help="the fine-tuned UNet checkpoint (default: the preset's dif epochs, sd: 10); "
                                  "0: the UNet without fine-tuning")
    inf_steps: int = setting(None, type=positive_int, group=PAPER,
                             help="sampling steps (default: the preset's, sd: 50)")
    ugs: float = setting(None, type=non_negative_float, group=PAPER,
                         help="unconditional guidance scale (default: the preset's, sd: 7.5)")
    exp: str = experiment_setting()
    preset: str = preset_setting()
    seed: int = setting(0, type=non_negative_int, help="seed of the images' noise")
    eta: float = setting(0.0, type=non_negative_float, help="DDIM eta (0: deterministic)")
    sampler: str = sampler_setting()
    timestep_spacing: str = timestep_spacing_setting()
    conditioning: str = conditioning_setting()
    prompt_template: str = prompt_template_setting()
    ti_tokens: int = ti_tokens_setting()
    only_class: int = setting(None, type=non_negative_int,
                              help="generate only this class's images of the data set (default: every class)")
    shard: str = setting(None, help="K/N: write only images n with n %% N == K (default: the array job's task, "
                                    "SLURM_ARRAY_TASK_ID/COUNT or SGE_TASK_*, else 0/1)")
    verify: tuple = setting(None, type=existing_folder, nargs="+", metavar="FOLDER",
                            help="only check that these folders (one, or one per shard) together hold exactly "
                                 "one complete data set: same settings, every class's count, no duplicates, "
                                 "whole PNGs")
    out_dir: str = setting(None, type=folder, help="output folder (default Data/Synthetic/Exp_{exp}/{dataset})")
    keep_generation_size: bool = setting(False, help="also keep the images at the model's size in the "
                                                     "sibling folder {out_dir}_{S}px")
    grid_per_class: int = setting(8, type=non_negative_int, help="images per class in samples.png")
    data_dir: str = data_dir_setting(
        help="the real data, read only to size the default data set (x1) when neither "
                                 "--img_class nor --img_total is given (default $SDDG_DATA_DIR or the cache)")
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()

    def __post_init__(self):
        super().__post_init__()
        if self.img_class is not None and self.img_total is not None:
            raise UserError("give --img_class (images per class) or --img_total (images in all), not both")
        if self.eta and self.sampler != DDIM.name:
            raise UserError(f"--eta is DDIM's; --sampler {self.sampler} takes no eta")

    def resolved(self):
        """The same settings with every default filled in: img_total, epochs, steps, guidance, shard."""
        from Models.diffusion.presets import get_preset
        from Models.diffusion.schedule import check_inference_steps

        spec, preset = dataset_spec(self), get_preset(self.preset)
        if self.img_total is not None:
            total = self.img_total
        elif self.img_class is not None:
            total = self.img_class * spec.num_classes
        else:
            total = _real_train_size(self)
        shard = self.shard
        if shard is None:
            shard = "/".join(map(str, shard_from_environment(os.environ) or (0, 1)))
        parse_shard(shard)
        return self.replace(
            dataset=spec.name, preset=preset.name, img_class=None, img_total=total, shard=shard,
            enc_epoch=preset.enc_epochs if self.enc_epoch is None else self.enc_epoch,
            dif_epoch=preset.dif_epochs if self.dif_epoch is None else self.dif_epoch,
            inf_steps=check_inference_steps(preset.default_inference_steps if self.inf_steps is None
                                            else self.inf_steps),
            ugs=float(preset.default_guidance_scale if self.ugs is None else self.ugs))

    def output_folder(self):
        """Where the data set goes: out_dir, else Data/Synthetic/Exp_{exp}/{dataset}."""
        from Utils.paths import synthetic_dir

        return Path(self.out_dir) if self.out_dir else synthetic_dir(self.exp, dataset_spec(self).name)


@dataclass(frozen=True)
class GenerateResult:
    """What a generation run made (or, with `verify`, what it checked).

    Attributes:
        out_dir: the data set's folder (None for verify).
        img_total: images in the whole data set.
        per_class: images per class of the whole data set.
        in_part: images of this run's part (shard, only_class).
        written: images this run wrote (0 when everything was on disk).
        on_disk: images per class on disk after the run.
        complete: every image of the data set is on disk.
        checkpoints: {"enc": path, "dif": path or None}.
        settings: the resolved settings (`settings.command(SCRIPT)` reruns it).
        verified: `Data.shards.verify_parts`' summary (verify only).
    """

    out_dir: Path = None
    img_total: int = 0
    per_class: tuple = ()
    in_part: int = 0
    written: int = 0
    on_disk: tuple = ()
    complete: bool = False
    checkpoints: dict = field(default_factory=dict)
    settings: GenerateSettings = None
    verified: dict = None


def _real_train_size(settings):
    try:
        return len(load_real(settings).y_train)
    except (UserError, ValueError) as e:  # the loaders' own input errors are ValueErrors
        raise UserError(f"without --img_class or --img_total the data set is as large as the real "
                        f"training split, which needs the real data: {e}") from None


def is_done(settings):
    """A short reason when the whole data set of these settings is on disk (the manifest says complete)."""
    from Data.synthetic_writer import read_manifest, same_settings

    if settings.verify:
        return None
    r = settings.resolved()
    out_dir = r.output_folder()
    manifest = read_manifest(out_dir)
    if not manifest or not manifest.get("complete") or manifest.get("img_total") != r.img_total:
        return None
    stored = {**_MANIFEST_DEFAULTS, **(manifest.get("settings") or {})}
    if not same_settings({k: stored.get(k) for k in _FLAG_KEYS}, {k: getattr(r, k) for k in _FLAG_KEYS}):
        return None
    # Recorded only when it is not the checkpoint's (`_plan`); a spacing given equal to it runs and finds the set.
    if stored.get("timestep_spacing") != r.timestep_spacing:
        return None
    if r.keep_generation_size:
        kept = out_dir.with_name(f"{out_dir.name}_{stored.get('generation_size')}px")
        if len(list(kept.glob("class_*/img_*.png"))) != r.img_total:
            return None
    return f"{r.img_total} images generated in {out_dir}"


def _check_default_epoch(given, epoch, exp, dataset, stage, flag, what, preset):
    """A one-line error naming the checkpoints that exist when a DEFAULT epoch has none."""
    from Models.diffusion import checkpoints as ck
    from Utils.paths import diffusion_checkpoint_dir

    if given is not None or not epoch:
        return
    have = ck.available_epochs(exp, dataset, stage)
    if epoch not in have:
        hint = " (0: the UNet without fine-tuning)" if stage == "dif" else ""
        raise UserError(f"{flag} defaults to preset {preset}'s {epoch}, but {diffusion_checkpoint_dir(exp, dataset, stage)}"
                        f" has no {what} checkpoint of epoch {epoch} (epochs there: "
                        f"{', '.join(map(str, have)) or 'none'}); pass {flag}{hint}")


def _plan(settings):
    """Checks every setting and checkpoint; returns what to write. Writes nothing."""
    from Data.synthetic_writer import SyntheticWriter, read_manifest
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.presets import get_preset

    r = settings.resolved()
    spec, preset = dataset_spec(r), get_preset(r.preset)
    if r.only_class is not None and not r.only_class < spec.num_classes:
        raise UserError(f"--only_class must be in [0, {spec.num_classes - 1}] for {spec.name}, got {r.only_class}")
    if r.img_total < spec.num_classes:
        raise UserError(f"--img_total {r.img_total} is fewer than {spec.name}'s {spec.num_classes} classes")
    conditioning = conditioning_spec(r)
    if ck.needs_enc_checkpoint(preset, conditioning):
        _check_default_epoch(settings.enc_epoch, r.enc_epoch, r.exp, spec.name, "enc", "--enc_epoch",
                             "class-encoder", preset.name)
    _check_default_epoch(settings.dif_epoch, r.dif_epoch, r.exp, spec.name, "dif", "--dif_epoch",
                         "fine-tuned UNet", preset.name)
    enc_settings, used = ck.resolve_generation_checkpoints(preset, spec, r.exp, r.enc_epoch, r.dif_epoch,
                                                           conditioning)
    generation_size = ck.image_size_for(preset, spec)
    # The manifest names the spacing only when it overrides the checkpoint's: sets made before the flag
    # existed, and the same set asked for with the checkpoint's own spacing spelled out, stay one set.
    spacing = r.timestep_spacing if r.timestep_spacing != ck.schedule_settings(enc_settings)["timestep_spacing"] \
        else None
    r = r.replace(timestep_spacing=spacing)
    manifest_settings = {
        "dataset": spec.name, "preset": preset.name, "img_total": r.img_total, "exp": r.exp,
        "enc_epoch": r.enc_epoch, "dif_epoch": r.dif_epoch, "inf_steps": r.inf_steps, "ugs": r.ugs,
        "eta": float(r.eta), "sampler": r.sampler, "seed": r.seed, "native_size": spec.image_size,
        "generation_size": generation_size, "random_init": enc_settings["random_init"],
        "init_seed": enc_settings.get("init_seed", 0), "mixed_precision": r.mixed_precision,
        **conditioning.record(), **({"timestep_spacing": spacing} if spacing else {}),
    }
    stored = (read_manifest(r.output_folder()) or {}).get("settings") or {}
    for key, default in _MANIFEST_DEFAULTS.items():
        if stored and key not in stored and manifest_settings[key] == default:
            del manifest_settings[key]  # a set begun before the key existed: its other parts match it
    counts = per_class_counts(r.img_total, spec.num_classes)
    trained_on = {key: enc_settings.get(key) for key in ("data_verification", "train_subset")}
    writer = SyntheticWriter(r.output_folder(), spec, counts, manifest_settings,
                             keep_size=generation_size if r.keep_generation_size else None, trained_on=trained_on)
    writer.check_folder()
    k, n = parse_shard(r.shard)
    classes = [r.only_class] if r.only_class is not None else range(spec.num_classes)
    wanted = [(c, i) for c in classes for i in range(counts[c]) if i % n == k]
    return r, spec, preset, used, enc_settings, writer, wanted


def verify(folders, log=print):
    """Checks that `folders` (parts written by several workers) make exactly one complete data set."""
    from Data.shards import verify_parts

    summary = verify_parts(folders)
    log(f"verified: {summary['images']} images {summary['per_class']} per class in {len(folders)} folder(s), "
        f"one data set ({summary['settings']['dataset']}), no duplicates, every PNG whole")
    return GenerateResult(img_total=summary["images"], per_class=tuple(summary["per_class"]),
                          on_disk=tuple(summary["per_class"]), complete=True, verified=summary)


def run(settings, log=print):
    """Generates the images of `settings` that are not on disk yet; returns a GenerateResult.

    Bad input (unknown dataset, missing checkpoint, a folder holding another data set)
    raises UserError before anything is written. With `settings.verify` only checks parts.
    """
    if settings.verify:
        return verify(settings.verify, log=log)
    r, spec, preset, used, enc_settings, writer, wanted = _plan(settings)
    writer.remove_stale_temporaries()
    todo = [(c, n) for c, n in wanted if writer.missing(c, n)]
    log(f"{spec.name}: {len(wanted)} images in this part ({r.shard}"
        f"{'' if r.only_class is None else f', class {r.only_class}'}), "
        f"{len(wanted) - len(todo)} already on disk, {len(todo)} to generate -> {writer.folder}")

    if todo:
        import numpy as np
        from tqdm.auto import tqdm

        from Models.diffusion import checkpoints as ck
        from Utils.runtime import configure_runtime

        jit = configure_runtime(seed=r.seed, mixed_precision=r.mixed_precision, xla=r.xla)
        model = _cached_model(r, preset, spec, used, enc_settings, lambda: ck.load_generation_model(
            preset, spec, r.exp, r.enc_epoch, r.dif_epoch, conditioning_spec(r))[0])
        writer.begin(used)
        labels = np.array([c for c, _ in todo], np.int64)
        indices = np.array([n for _, n in todo], np.int64)
        batches = model.generate_batches(labels, num_steps=r.inf_steps, guidance_scale=r.ugs, seed=r.seed,
                                         eta=r.eta, batch_size=r.batch_size, indices=indices, jit_compile=jit,
                                         sampler=r.sampler, timestep_spacing=r.timestep_spacing)
        with tqdm(total=len(todo), desc="images", unit="img", file=sys.stdout) as bar:
            for chunk, images in batches:
                writer.write(images, labels[chunk], indices[chunk])
                bar.update(len(images))

    part = f"shard {r.shard}, class {r.only_class if r.only_class is not None else 'all'}"
    s = writer.settings
    title = (f"{spec.name}, {s['preset']}: enc {s['enc_epoch']}, dif {s['dif_epoch']}, "
             f"{s['inf_steps']} steps, ugs {s['ugs']:g}, seed {s['seed']}")
    on_disk, complete = writer.finish(part, len(wanted), used, grid_per_class=r.grid_per_class, title=title)
    state = "complete" if complete else f"{sum(on_disk)} of {r.img_total} images on disk (other parts pending)"
    log(f"done: {writer.folder} ({state})")
    return GenerateResult(out_dir=writer.folder, img_total=r.img_total, per_class=tuple(writer.counts),
                          in_part=len(wanted), written=len(todo), on_disk=tuple(on_disk), complete=complete,
                          checkpoints=dict(used), settings=r)


# In-process callers (tests, notebooks, the pipeline, a driver running one shard after another)
# reuse the loaded model and its compiled sampler when the same checkpoint files are asked for.
_MODEL_CACHE = {}


def _cached_model(r, preset, spec, used, enc_settings, load):
    from Utils.runtime import distribution_scope

    files = [p for p in used.values() if p]
    key = (preset.name, spec.name, r.mixed_precision, r.multi_gpu, enc_settings["random_init"],
           enc_settings.get("init_seed", 0), tuple((p, os.stat(p).st_mtime_ns) for p in files),
           repr(conditioning_spec(r)))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        with distribution_scope(r.multi_gpu):
            _MODEL_CACHE[key] = load()
    return _MODEL_CACHE[key]
