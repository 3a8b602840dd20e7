"""Generates a synthetic data set with the trained class-conditional model (PAPER.md stage 5).

    python generate_dataset.py --dataset retinamnist --img_total 1080 --enc_epoch 37 --dif_epoch 4 \\
        --inf_steps 31 --ugs 2.3 --exp 0
    # 4 machines writing one data set: run with --shard 0/4 ... --shard 3/4 (same other flags)
    python generate_dataset.py --dataset digits --preset tiny --img_total 1000 --enc_epoch 40 --shard 1/4

Writes Data/Synthetic/Exp_{exp}/{dataset}/class_{NN}/img_{n}.png (or --out_dir),
balanced over classes (img_total // C per class, one more for the first
img_total % C classes), at the dataset's native resolution (antialiased
downsizing, Data.images.RESIZE_METHOD), each file written atomically, plus
manifest.json (settings, checkpoints used, resize method, counts, versions) and
samples.png (a grid per class). With --keep_generation_size the images at the
model's size (sd: 128 px) also go to the sibling folder `{dataset}_{S}px/`.

Image n of class c depends only on (--seed, c, n) and the model settings:
batch sizes, shards and interrupted runs give identical files. Killed and run
again, it skips the images that exist and decode, and writes the rest. Running
with different settings into a folder that holds another data set is an error.

--img_class C generates only class C's images of the data set; --shard K/N
only the images whose index within their class is n % N == K (in an array
job it defaults to the job's task: SLURM_ARRAY_TASK_ID/COUNT, SGE_TASK_*).
Several workers with different --shard (or --img_class) values fill one
folder, or one folder each; `--verify FOLDER...` then proves that the parts
make exactly one complete data set (Data/shards.py), and the CAS stage
(classifier_training.py) refuses a generated folder with images missing.

    python generate_dataset.py --verify Data/Synthetic/Exp_0/retinamnist
--dif_epoch 0 (default) uses the UNet without fine-tuning (sd: keras-cv's
pretrained UNet; tiny: the UNet its enc stage trained).
"""

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Utils.cli import (ArgumentParser, UserError, existing_folder, folder, non_negative_float,  # noqa: E402
                       non_negative_int, positive_int, run_cli)
from Utils.runtime import add_runtime_flags  # noqa: E402
from Models.diffusion.presets import preset_help  # noqa: E402
from Data.balance import per_class_counts  # noqa: E402
from Data.shards import image_path, is_complete_png, parse_shard, shard_from_environment, verify_parts  # noqa: E402

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
paper = parser.add_argument_group("the paper's flags")
paper.add_argument("--dataset", help="a registered dataset (Data/registry.py); required unless --verify")
paper.add_argument("--img_class", type=non_negative_int, default=None,
                   help="generate only this class's share of the data set (default: every class)")
paper.add_argument("--img_total", type=positive_int,
                   help="images in the whole data set, balanced over classes; required unless --verify")
paper.add_argument("--batch_size", type=positive_int, default=250,
                   help="images per sampler call (default 250, the paper's; does not change the images)")
paper.add_argument("--enc_epoch", type=positive_int, help="the class-encoder checkpoint; required unless --verify")
paper.add_argument("--dif_epoch", type=non_negative_int, default=0,
                   help="the fine-tuned UNet checkpoint; 0 (default): the UNet without fine-tuning")
paper.add_argument("--inf_steps", type=positive_int, default=None,
                   help="DDIM steps (default: the preset's, 50 for sd)")
paper.add_argument("--ugs", type=non_negative_float, default=None,
                   help="unconditional guidance scale (default: the preset's, 7.5 for sd)")
paper.add_argument("--exp", type=non_negative_int, default=0, help="experiment number (default 0)")
ours = parser.add_argument_group("added flags")
ours.add_argument("--preset", default="sd1", help=preset_help("sd1"))
ours.add_argument("--seed", type=non_negative_int, default=0, help="seed of the images' noise (default 0)")
ours.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (default 0: deterministic)")
ours.add_argument("--shard", default=None,
                  help="K/N: write only images n with n %% N == K (default: the array job's task, "
                       "SLURM_ARRAY_TASK_ID/COUNT or SGE_TASK_*, else 0/1)")
ours.add_argument("--verify", nargs="+", type=existing_folder, metavar="FOLDER", default=None,
                  help="only check that these folders (one, or one per shard) together hold exactly one "
                       "complete data set: same settings, every class's count, no duplicates, whole PNGs")
ours.add_argument("--out_dir", type=folder, default=None, help="output folder (default Data/Synthetic/Exp_{exp}/{dataset})")
ours.add_argument("--keep_generation_size", action="store_true",
                  help="also keep the images at the model's size in the sibling folder {out_dir}_{S}px")
ours.add_argument("--grid_per_class", type=non_negative_int, default=8, help="images per class in samples.png (default 8)")
add_runtime_flags(parser)

# A temporary image file older than this is a leftover of a killed run.
STALE_SECONDS = 600


def resolve(args):
    """Checks every flag and checkpoint; returns the plan. Writes nothing."""
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.presets import get_preset
    from Models.diffusion.schedule import check_inference_steps
    from Utils.paths import synthetic_dir

    missing = [flag for flag in ("dataset", "img_total", "enc_epoch") if getattr(args, flag) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    spec, preset = get_spec(args.dataset), get_preset(args.preset)
    if args.shard is None:
        args.shard = "/".join(map(str, shard_from_environment(os.environ) or (0, 1)))
    shard = parse_shard(args.shard)
    if args.img_class is not None and not 0 <= args.img_class < spec.num_classes:
        raise UserError(f"--img_class must be in [0, {spec.num_classes - 1}] for {spec.name}, got {args.img_class}")
    if args.img_total < spec.num_classes:
        raise UserError(f"--img_total {args.img_total} is fewer than {spec.name}'s {spec.num_classes} classes")
    steps = check_inference_steps(args.inf_steps if args.inf_steps is not None else preset.default_inference_steps)
    ugs = float(args.ugs if args.ugs is not None else preset.default_guidance_scale)
    enc_settings, used = ck.resolve_generation_checkpoints(preset, spec, args.exp, args.enc_epoch, args.dif_epoch)
    out_dir = Path(args.out_dir) if args.out_dir else synthetic_dir(args.exp, spec.name)
    generation_size = ck.image_size_for(preset, spec)
    settings = {
        "dataset": spec.name, "preset": preset.name, "img_total": args.img_total, "exp": args.exp,
        "enc_epoch": args.enc_epoch, "dif_epoch": args.dif_epoch, "inf_steps": steps, "ugs": ugs,
        "eta": float(args.eta), "seed": args.seed, "native_size": spec.image_size,
        "generation_size": generation_size, "random_init": enc_settings["random_init"],
        "init_seed": enc_settings.get("init_seed", 0), "mixed_precision": args.mixed_precision,
    }
    manifest = _read_manifest(out_dir)
    if manifest is not None and manifest.get("settings") != settings:
        stored = manifest.get("settings") or {}
        diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        raise UserError(f"{out_dir} holds a data set made with other settings ({', '.join(diff)} differ: "
                        f"{', '.join(f'{k}={stored.get(k)!r}' for k in diff)}); use another --out_dir")
    if manifest is None and out_dir.exists() and any(out_dir.glob("class_*")):
        raise UserError(f"{out_dir} holds class folders but no manifest.json; use another --out_dir")
    counts = per_class_counts(args.img_total, spec.num_classes)
    classes = [args.img_class] if args.img_class is not None else range(spec.num_classes)
    wanted = [(c, n) for c in classes for n in range(counts[c]) if n % shard[1] == shard[0]]
    return dict(spec=spec, preset=preset, shard=shard, steps=steps, ugs=ugs, used=used, out_dir=out_dir,
                settings=settings, counts=counts, wanted=wanted, generation_size=generation_size)


def _read_manifest(out_dir):
    from Utils.io import read_json

    return read_json(Path(out_dir) / "manifest.json")


def versions():
    import keras
    import numpy
    import PIL

    found = {"python": platform.python_version(), "keras": keras.__version__, "numpy": numpy.__version__,
             "pillow": PIL.__version__, "keras_backend": keras.backend.backend()}
    try:
        import tensorflow

        found["tensorflow"] = tensorflow.__version__
    except ImportError:
        pass
    return found


def count_existing(out_dir, counts, size):
    """How many images of the whole data set are on disk and decode, per class."""
    return [sum(is_complete_png(image_path(out_dir, c, n), size) for n in range(count))
            for c, count in enumerate(counts)]


def main(argv=None):
    args = parser.parse_args(argv)
    if args.verify:
        summary = verify_parts(args.verify)
        print(f"verified: {summary['images']} images {summary['per_class']} per class in "
              f"{len(args.verify)} folder(s), one data set ({summary['settings']['dataset']}), "
              f"no duplicates, every PNG whole")
        return 0
    plan = resolve(args)
    spec, out_dir, size = plan["spec"], plan["out_dir"], plan["spec"].image_size
    keep_dir = out_dir.with_name(f"{out_dir.name}_{plan['generation_size']}px") if args.keep_generation_size else None

    def missing(label, n):
        if not is_complete_png(image_path(out_dir, label, n), size):
            return True
        return keep_dir is not None and not is_complete_png(image_path(keep_dir, label, n), plan["generation_size"])

    _remove_stale_temporaries(out_dir, keep_dir)
    todo = [(c, n) for c, n in plan["wanted"] if missing(c, n)]
    print(f"{spec.name}: {len(plan['wanted'])} images in this part ({args.shard}"
          f"{'' if args.img_class is None else f', class {args.img_class}'}), "
          f"{len(plan['wanted']) - len(todo)} already on disk, {len(todo)} to generate -> {out_dir}")

    import numpy as np
    from tqdm.auto import tqdm

    from Data.images import RESIZE_METHOD, resize_images
    from Models.diffusion import checkpoints as ck
    from Utils.io import merge_json
    from Utils.runtime import configure_runtime

    manifest_path = out_dir / "manifest.json"
    header = {"settings": plan["settings"], "img_total": args.img_total,
              "per_class": plan["counts"], "resize_method": RESIZE_METHOD,
              "checkpoints": plan["used"], "label_names": list(spec.label_names),
              "layout": "class_{NN}/img_{n}.png, n = index within class; image (c, n) depends only on "
                        "(seed, c, n) and the settings"}
    if todo:
        jit = configure_runtime(seed=args.seed, mixed_precision=args.mixed_precision, xla=args.xla)
        model = _cached_model(plan, args, lambda: ck.load_generation_model(
            plan["preset"], spec, args.exp, args.enc_epoch, args.dif_epoch)[0])
        merge_json(manifest_path, {**header, "versions": versions(), "complete": False})
        labels = np.array([c for c, _ in todo], np.int64)
        indices = np.array([n for _, n in todo], np.int64)
        batches = model.generate_batches(labels, num_steps=plan["steps"], guidance_scale=plan["ugs"],
                                         seed=args.seed, eta=args.eta, batch_size=args.batch_size,
                                         indices=indices, jit_compile=jit)
        with tqdm(total=len(todo), desc="images", unit="img", file=sys.stdout) as bar:
            for chunk, images in batches:
                small = resize_images(images, size)
                for image, big, label, n in zip(small, images, labels[chunk], indices[chunk]):
                    _write_png(image_path(out_dir, label, n), image, spec.channels)
                    if keep_dir is not None:
                        _write_png(image_path(keep_dir, label, n), big, spec.channels)
                bar.update(len(images))

    on_disk = count_existing(out_dir, plan["counts"], size)
    complete = on_disk == plan["counts"]
    merge_json(manifest_path, {**header, "complete": complete, "counts_on_disk": on_disk,
                               "parts": {f"shard {args.shard}, class {args.img_class if args.img_class is not None else 'all'}":
                                         {"images": len(plan["wanted"]), "done": True}}})
    if args.grid_per_class:
        _save_grid(out_dir, spec, on_disk, args.grid_per_class, plan)
    state = "complete" if complete else f"{sum(on_disk)} of {args.img_total} images on disk (other parts pending)"
    print(f"done: {out_dir} ({state})")
    return 0


# In-process callers (tests, notebooks, a driver calling main() per shard) reuse the
# loaded model and its compiled sampler when the same checkpoint files are asked for.
_MODEL_CACHE = {}


def _cached_model(plan, args, load):
    from Utils.runtime import distribution_scope

    files = [p for p in plan["used"].values() if p]
    key = (plan["preset"].name, plan["spec"].name, args.mixed_precision, args.multi_gpu,
           plan["settings"]["random_init"], plan["settings"]["init_seed"],
           tuple((p, os.stat(p).st_mtime_ns) for p in files))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        with distribution_scope(args.multi_gpu):
            _MODEL_CACHE[key] = load()
    return _MODEL_CACHE[key]


def _remove_stale_temporaries(*folders):
    """Deletes temporary files that killed runs left in class folders (Utils.io.atomic_path names).

    Only files older than STALE_SECONDS: a worker writing another shard into the
    same folder right now keeps its temporary file. Readers skip them anyway
    (hidden names).
    """
    import time

    for part in folders:
        if part is None or not part.is_dir():
            continue
        for path in part.glob("class_*/.img_*.tmp.png"):
            try:
                if time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()
            except FileNotFoundError:
                pass


def _write_png(path, image, channels=3):
    """One PNG in the dataset's native mode: grey datasets get mode "L" (luma; exact for grey pixels)."""
    from PIL import Image

    from Utils.io import atomic_path

    picture = Image.fromarray(image if image.shape[-1] == 3 else image[..., 0])
    with atomic_path(path) as tmp:
        (picture.convert("L") if channels == 1 else picture).save(tmp, format="PNG")


def _save_grid(out_dir, spec, on_disk, per_class, plan):
    import numpy as np
    from PIL import Image

    from Data.images import save_image_grid

    images, labels = [], []
    for c, have in enumerate(on_disk):
        for n in range(min(per_class, plan["counts"][c])):
            path = image_path(out_dir, c, n)
            if is_complete_png(path, spec.image_size):
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB")))
                labels.append(c)
    if images:
        s = plan["settings"]
        save_image_grid(np.stack(images), np.array(labels), spec.label_names, out_dir / "samples.png",
                        per_class=per_class,
                        title=f"{spec.name}, {s['preset']}: enc {s['enc_epoch']}, dif {s['dif_epoch']}, "
                              f"{s['inf_steps']} steps, ugs {s['ugs']:g}, seed {s['seed']}")


if __name__ == "__main__":
    run_cli(main)
