"""A generated data set written in parts: which part a worker writes, and proof the parts add up.

generate_dataset.py writes image n of class c to `class_{c:02d}/img_{n}.png`;
shard K/N writes the images with n % N == K. The N parts may share one folder
(a shared disk) or be N folders (machines without one). `verify_parts` checks
that their union is exactly one data set: the same settings in every
manifest.json, every class's count, no image twice, no stray image, every PNG
whole, no two images with identical pixels.

An array job needs no --shard: `shard_from_environment` reads the scheduler's
task index and count (SLURM, Sun/Univa Grid Engine).

Example:
    >>> shard_from_environment({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
    ...                         "SLURM_ARRAY_TASK_MIN": "0"})
    (2, 4)
    >>> verify_parts(["part0", "part1"])        # DataError naming the first problems, or a summary
    {'images': 1080, 'per_class': [216, ...], 'folders': 2, ...}
"""

import hashlib
import re
from pathlib import Path

from Data.errors import DataError
from Utils.io import read_json

MANIFEST = "manifest.json"
_IMAGE_NAME = re.compile(r"^class_(\d+)/img_(\d+)\.png$")
# Problems named in the one-line error; the rest are counted.
_PROBLEMS_SHOWN = 3


def parse_shard(text):
    """'K/N' -> (K, N); a DataError unless N >= 1 and 0 <= K < N."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise DataError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise DataError(f"--shard {text}: need N >= 1 and 0 <= K < N")
    return k, n


def _env_int(environ, name):
    try:
        return int(environ[name])
    except ValueError:
        raise DataError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def shard_from_environment(environ):
    """(K, N) from an array job's variables, or None outside one.

    SLURM: K = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, N = SLURM_ARRAY_TASK_COUNT
    (`--array=0-3` and `--array=1-4` both give 0..3 of 4). Grid Engine: SGE_TASK_ID,
    SGE_TASK_FIRST, SGE_TASK_LAST. Arrays with gaps or steps would skip parts: an error.
    """
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, count = _env_int(environ, "SLURM_ARRAY_TASK_ID"), _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        last = _env_int(environ, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in environ else first + count - 1
        source = "SLURM_ARRAY_TASK_*"
        if last - first + 1 != count:
            raise DataError(f"the SLURM array {first}-{last} has {count} tasks, not {last - first + 1}: "
                            "use a contiguous --array=0-{N-1} (no steps or gaps) or pass --shard K/N")
    elif "SGE_TASK_ID" in environ and environ.get("SGE_TASK_ID") != "undefined":
        task, first = _env_int(environ, "SGE_TASK_ID"), _env_int(environ, "SGE_TASK_FIRST")
        last = _env_int(environ, "SGE_TASK_LAST")
        step = _env_int(environ, "SGE_TASK_STEPSIZE") if "SGE_TASK_STEPSIZE" in environ else 1
        source = "SGE_TASK_*"
        if step != 1:
            raise DataError(f"the Grid Engine array has step {step}: use -t 1-N (step 1) or pass --shard K/N")
        count = last - first + 1
    else:
        return None
    k = task - first
    if count < 1 or not 0 <= k < count:
        raise DataError(f"{source}: task {task} is outside the array {first}..{first + count - 1}")
    return k, count


def image_path(folder, label, n):
    return Path(folder) / f"class_{label:02d}" / f"img_{n}.png"


def is_complete_png(path, size):
    """The file exists, decodes fully and has the expected size."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (size, size)
    except (OSError, ValueError, SyntaxError):
        return False


def _pixels_digest(path):
    from PIL import Image

    with Image.open(path) as image:
        return hashlib.sha256(image.tobytes()).hexdigest()


def _fail(what, problems):
    shown = "; ".join(problems[:_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - _PROBLEMS_SHOWN} more)" if len(problems) > _PROBLEMS_SHOWN else ""
    raise DataError(f"{what}: {shown}{more}")


def _read_manifests(folders):
    manifests = []
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder")
        manifest = read_json(folder / MANIFEST)
        if not manifest or "settings" not in manifest or "per_class" not in manifest:
            raise DataError(f"{folder} has no generate_dataset.py {MANIFEST}: not a generated data set part")
        manifests.append(manifest)
    first = manifests[0]
    for folder, manifest in zip(folders[1:], manifests[1:]):
        if manifest["settings"] != first["settings"] or manifest["per_class"] != first["per_class"]:
            keys = sorted(k for k in set(first["settings"]) | set(manifest["settings"])
                          if first["settings"].get(k) != manifest["settings"].get(k))
            shown = ", ".join(f"{k}={first['settings'].get(k)!r} vs {manifest['settings'].get(k)!r}" for k in keys)
            raise DataError(f"{folders[0]} and {folder} were generated with other settings "
                            f"({shown or 'per-class counts differ'}): they are parts of different data sets")
    return first


def verify_parts(folders, decode=True):
    """Checks that the parts in `folders` make exactly one complete data set; returns a summary.

    decode: open every PNG (whole, right size) and compare pixels for duplicates;
    False checks only names and counts (fast, for a reader about to decode anyway).
    Any problem is a DataError naming the first few.
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise DataError("no data set folder to verify")
    manifest = _read_manifests(folders)
    counts, size = manifest["per_class"], int(manifest["settings"]["native_size"])
    where, problems = {}, []
    for folder in folders:
        for path in sorted(folder.glob("class_*/*.png")):
            name = path.relative_to(folder).as_posix()
            match = _IMAGE_NAME.match(name)
            if match is None or path.name.startswith("."):
                continue  # samples and temporary files of running writers are not images of the set
            c, n = int(match.group(1)), int(match.group(2))
            if c >= len(counts) or n >= counts[c]:
                problems.append(f"{path} is not in the data set (class {c} has {counts[c] if c < len(counts) else 0})")
            elif (c, n) in where:
                problems.append(f"class {c} image {n} is in both {where[(c, n)]} and {folder}")
            else:
                where[(c, n)] = folder
    on_disk = [sum((c, n) in where for n in range(count)) for c, count in enumerate(counts)]
    for c, (have, want) in enumerate(zip(on_disk, counts)):
        if have != want:
            first_missing = next(n for n in range(want) if (c, n) not in where)
            problems.append(f"class {c} has {have} of {want} images (img_{first_missing}.png missing)")
    if problems:
        _fail(f"{len(folders)} folder(s) are not one complete data set", problems)
    if decode:
        digests = {}
        for (c, n), folder in sorted(where.items()):
            path = image_path(folder, c, n)
            if not is_complete_png(path, size):
                problems.append(f"{path} is not a whole {size}x{size} PNG")
                continue
            digest = _pixels_digest(path)
            if digest in digests:
                problems.append(f"{path} has the same pixels as {digests[digest]}")
            digests.setdefault(digest, path)
        if problems:
            _fail("the data set's images are broken or repeated", problems)
    return {"images": sum(on_disk), "per_class": on_disk, "folders": [str(f) for f in folders],
            "settings": manifest["settings"], "decoded": bool(decode)}


def require_complete(folder):
    """A DataError when `folder` is a generated data set (it has a manifest) with images missing.

    Folders of other implementations (no manifest) are not judged here.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return
    try:
        verify_parts([folder], decode=False)
    except DataError as e:
        raise DataError(f"{folder} is not a complete generated data set ({e}); finish every "
                        f"--shard part, then check with generate_dataset.py --verify") from None
