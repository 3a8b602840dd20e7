"""Synthetic data sets: any folder of class sub-folders → uint8 arrays + a report.

Reads our generator's output (`class_00/img_0.png`, ..., written by
`Data/synthetic_writer.py`) and other generators' output alike, e.g. a PyTorch pipeline's ImageFolder layout. Each sub-folder of
`folder` is one class; which class is decided, for all folders together, by
the first rule that fits every folder name:

1. `class_<N>` (ours): label N;
2. an integer `<N>` (`3/`): label N;
3. an official label name of the dataset (`airplane/`, case and `_`/`-`/space
   insensitive): that label;
4. otherwise: sorted folder-name order, label i = i-th folder (torchvision's
   ImageFolder rule), with a warning in the report.

Images may be png, jpg/jpeg, bmp, webp or tif/tiff, in sub-sub-folders too,
of any size and mode (grey, grey+alpha, RGBA, palette, 16-bit): everything is
converted to RGB (alpha dropped, as torchvision's loader does) and resized with
the one antialiased method (`Data.images.RESIZE_METHOD`) to the dataset's
native `spec.image_size`.

Nothing is dropped silently: unreadable image files, non-image files, missing
classes and classes without a readable image are listed in the returned
report (`format_report` turns it into lines for the command line). A folder
without class folders, or without any image, is a DataError.

`take` selects a seeded random, class-balanced subset: take // C images per
class, one more for each of the first take % C classes (Data/balance.py, the
rule generation follows too, so a generated set of N images serves any take
up to N). Asking a
class for more images than it has readable is a DataError naming the class.
Only the selected files are decoded, so `take` on a big folder is fast.

Example:
    >>> x, y, report = load_image_folder("Data/Synthetic/Exp_0/cifar10", get_spec("cifar10"),
    ...                                  take=40000, seed=0)
    >>> print("\\n".join(format_report(report)))
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from Data.balance import per_class_counts
from Data.errors import DataError, DatasetNotFoundError
from Data.images import RESIZE_METHOD, resize_pil

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Decoding runs in threads: Pillow releases the GIL while it decompresses and resizes.
DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
_PROGRESS_FROM = 2000  # show a progress bar when decoding at least this many files


def load_image_folder(folder, spec, take=None, seed=0):
    """Loads a folder of class sub-folders as (x, y, report) for the dataset `spec`.

    Args:
        folder: the folder holding one sub-folder per class.
        spec: the DatasetSpec; images come back at spec.image_size, 3 channels.
        take: total number of images, class-balanced; None → every readable image.
        seed: seeds the random subset and the remainder's classes.

    Returns:
        x: uint8 (N, S, S, 3); y: int64 (N,), in class order; report: a dict
        (see `format_report`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"synthetic data folder {folder} does not exist")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder} has no class sub-folders (expected e.g. class_00/, class_01/, ...)")
    labels, rule, warnings = _assign_labels([p.name for p in class_dirs], spec, folder)

    files = {label: [] for label in range(spec.num_classes)}
    folder_of = {}
    non_images = []
    for path, label in zip(class_dirs, labels):
        folder_of[label] = path.name
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name.startswith("."):
                continue
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                files[label].append(file)
            else:
                non_images.append(str(file.relative_to(folder)))
    if not any(files.values()):
        raise DataError(f"{folder} has no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"in its {len(class_dirs)} class folders")

    report = {
        "folder": str(folder),
        "dataset": spec.name,
        "label_rule": rule,
        "class_folders": {str(k): v for k, v in sorted(folder_of.items())},
        "missing_classes": [_class_name(spec, c) for c in range(spec.num_classes) if c not in folder_of],
        "files_found": {str(c): len(files[c]) for c in range(spec.num_classes)},
        "non_image_files": non_images,
        "unreadable_files": [],
        "empty_classes": [],
        "resized_from": {},
        "modes": {},
        "image_size": spec.image_size,
        "resize_method": RESIZE_METHOD,
        "take": take,
        "seed": seed,
        "warnings": warnings,
    }

    rng = np.random.default_rng(seed)
    wanted = _per_class_counts(take, spec.num_classes) if take is not None else None
    total = sum(len(v) for v in files.values()) if wanted is None else int(sum(wanted))
    bar = tqdm(total=total, desc=f"decoding {folder.name}", unit="img", leave=False,
               disable=total < _PROGRESS_FROM)
    xs, ys = [], []
    try:
        for label in range(spec.num_classes):
            candidates = files[label]
            if wanted is not None:
                candidates = [candidates[i] for i in rng.permutation(len(candidates))]
            need = len(candidates) if wanted is None else wanted[label]
            images = _decode_until(candidates, need, spec.image_size, folder, report, bar)
            if not images and label in folder_of:
                report["empty_classes"].append(_class_name(spec, label))
            if wanted is not None and len(images) < need:
                where = (f"has {len(images)} readable images in {folder / folder_of[label]}"
                         if label in folder_of else f"has no folder in {folder}")
                raise DataError(f"class {_class_name(spec, label)} {where}, "
                                f"but take={take} needs {need} of this class")
            if images:
                xs.append(np.stack(images))
                ys.append(np.full(len(images), label, np.int64))
    finally:
        bar.close()
    if not xs:
        raise DataError(f"no readable image in {folder} ({len(report['unreadable_files'])} unreadable)")
    x, y = np.concatenate(xs), np.concatenate(ys)
    report["counts"] = {str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=spec.num_classes))}
    report["total"] = int(len(y))
    return x, y, report


def format_report(report):
    """Lines for the command line: what was read and everything that was skipped."""
    lines = [f"{report['folder']}: {report['total']} images for {report['dataset']} "
             f"(labels by {report['label_rule']}, resized to {report['image_size']} px, "
             f"{report['resize_method']})"]
    lines += [f"warning: {w}" for w in report["warnings"]]
    if report["missing_classes"]:
        lines.append(f"warning: no folder for class(es): {', '.join(report['missing_classes'])}")
    if report["empty_classes"]:
        lines.append(f"warning: no readable image for class(es): {', '.join(report['empty_classes'])}")
    if report["unreadable_files"]:
        shown = "; ".join(f"{f} ({why})" for f, why in report["unreadable_files"][:5])
        more = len(report["unreadable_files"]) - 5
        lines.append(f"warning: {len(report['unreadable_files'])} unreadable image file(s) skipped: "
                     f"{shown}{f'; and {more} more' if more > 0 else ''}")
    if report["non_image_files"]:
        shown = ", ".join(report["non_image_files"][:5])
        more = len(report["non_image_files"]) - 5
        lines.append(f"note: {len(report['non_image_files'])} non-image file(s) ignored: "
                     f"{shown}{f', and {more} more' if more > 0 else ''}")
    if report["resized_from"]:
        sizes = ", ".join(f"{k} x{v}" for k, v in report["resized_from"].items())
        lines.append(f"note: resized from {sizes}")
    return lines


# ------------------------------------------------------------- internals ----

def _normalise(name):
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _assign_labels(names, spec, folder):
    """Labels for the class folder names, the rule used, and warnings."""
    count = spec.num_classes
    rules = [
        ("class_<N> folder names", lambda n: _int_or_none(re.fullmatch(r"class_(\d+)", n))),
        ("integer folder names", lambda n: _int_or_none(re.fullmatch(r"(\d+)", n))),
        ("label-name folder names",
         lambda n: {_normalise(l): i for i, l in enumerate(spec.label_names)}.get(_normalise(n))),
    ]
    for rule, parse in rules:
        labels = [parse(n) for n in names]
        if all(label is not None for label in labels):
            bad = [n for n, label in zip(names, labels) if label >= count]
            if bad:
                raise DataError(f"{folder}: class folder(s) {', '.join(bad)} out of range for "
                                f"{spec.name}'s {count} classes (0..{count - 1})")
            if len(set(labels)) != len(labels):
                raise DataError(f"{folder}: two class folders map to the same label ({', '.join(names)})")
            return labels, rule, []
    if len(names) > count:
        raise DataError(f"{folder} has {len(names)} class folders but {spec.name} has {count} classes")
    warning = (f"folder names are neither class_<N>, integers nor {spec.name} label names: "
               f"labels follow sorted folder order ({', '.join(f'{n}={i}' for i, n in enumerate(names))})")
    return list(range(len(names))), "sorted folder order", [warning]


def _int_or_none(match):
    return int(match.group(1)) if match else None


def _class_name(spec, label):
    return f"{label} ({spec.label_names[label]})"


def _per_class_counts(take, num_classes):
    if take <= 0:
        raise DataError(f"take must be a positive number of images, got {take}")
    return per_class_counts(take, num_classes)


def _decode_until(candidates, need, size, folder, report, bar):
    """Decodes candidates in order until `need` images are read; records failures in `report`."""
    images = []
    position = 0
    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        while len(images) < need and position < len(candidates):
            batch = candidates[position:position + (need - len(images))]
            position += len(batch)
            for file, result in zip(batch, pool.map(lambda f: _decode(f, size), batch)):
                image, info = result
                if image is None:
                    report["unreadable_files"].append([str(file.relative_to(folder)), info])
                    continue
                images.append(image)
                mode, original = info
                report["modes"][mode] = report["modes"].get(mode, 0) + 1
                if original != (size, size):
                    key = f"{original[0]}x{original[1]}"
                    report["resized_from"][key] = report["resized_from"].get(key, 0) + 1
                bar.update(1)
    return images


def _decode(path, size):
    """(uint8 (size, size, 3), (mode, (w, h))) or (None, reason)."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, original = image.mode, image.size
            rgb = _to_rgb(image)
        return np.asarray(resize_pil(rgb, size), dtype=np.uint8), (mode, original)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # OSError covers truncated files; SyntaxError is what some Pillow plugins raise.
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grey: scale the full range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return image.convert("RGB")
