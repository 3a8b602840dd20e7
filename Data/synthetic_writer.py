"""Writes a generated data set's folder: the layout `Data/synthetic.py` reads back.

    {folder}/class_{NN}/img_{n}.png   image n of class NN, at the dataset's native size and mode
    {folder}/manifest.json            settings, checkpoints, counts, resize method, versions
    {folder}/samples.png              a grid of the first images of each class
    {folder}_{S}px/...                the same images at the model's size S (`keep_size`)

Every PNG is written atomically (`Utils.io.atomic_path`), so a killed writer
leaves whole images and hidden temporary files only; a rerun skips the images
that exist and decode (`missing`) and removes temporaries older than
`STALE_SECONDS` (a worker writing another shard into the same folder keeps its
own). The manifest is merged under a lock, so shards writing into one folder
at once all keep their part. A folder that holds another data set (other
settings in its manifest, or class folders without one) is refused before
anything is written (`check_folder`).

Example:
    >>> writer = SyntheticWriter(folder, spec, per_class_counts(43, 10), settings)
    >>> writer.check_folder()
    >>> writer.begin(checkpoints)        # {"enc": path, "dif": None}
    >>> writer.write(images_at_model_size, labels, indices)
    >>> on_disk, complete = writer.finish("shard 0/1, class all", 43, checkpoints, grid_per_class=8, title="...")
"""

import time
from pathlib import Path

from Data.images import RESIZE_METHOD, resize_images
from Data.shards import MANIFEST, image_path, is_complete_png
from Data.errors import DataError
from Utils.io import atomic_path, merge_json, read_json
from Utils.runtime import software_versions

# A temporary image file older than this is a leftover of a killed run.
STALE_SECONDS = 600

LAYOUT = ("class_{NN}/img_{n}.png, n = index within class; image (c, n) depends only on "
          "(seed, c, n) and the settings")


def read_manifest(folder):
    """The folder's manifest.json as a dict, or None."""
    return read_json(Path(folder) / MANIFEST)


def same_settings(stored, expected):
    """Whether two manifests' settings describe one data set (an `exp` that older versions wrote
    as a number matches its text: 0 and "0")."""
    def plain(settings):
        return {**settings, "exp": str(settings["exp"])} if isinstance(settings, dict) and "exp" in settings \
            else settings
    return plain(stored) == plain(expected)


def write_png(path, image, channels=3):
    """One PNG in the dataset's native mode: grey datasets get mode "L" (luma; exact for grey pixels)."""
    from PIL import Image

    picture = Image.fromarray(image if image.shape[-1] == 3 else image[..., 0])
    with atomic_path(path) as tmp:
        (picture.convert("L") if channels == 1 else picture).save(tmp, format="PNG")


def remove_stale_temporaries(*folders):
    """Deletes temporary files that killed runs left in class folders (Utils.io.atomic_path names).

    Only files older than STALE_SECONDS: a worker writing another shard into the
    same folder right now keeps its temporary file. Readers skip them anyway
    (hidden names).
    """
    for part in folders:
        if part is None or not Path(part).is_dir():
            continue
        for path in Path(part).glob("class_*/.img_*.tmp.png"):
            try:
                if time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()
            except FileNotFoundError:
                pass


def count_existing(folder, counts, size):
    """How many images of the whole data set are on disk and decode, per class."""
    return [sum(is_complete_png(image_path(folder, c, n), size) for n in range(count))
            for c, count in enumerate(counts)]


class SyntheticWriter:
    """The writer of one generated data set folder (see the module docstring).

    Args:
        folder: the data set's folder.
        spec: the DatasetSpec (native size, channels, label names).
        counts: images per class of the WHOLE data set (`Data.balance.per_class_counts`).
        settings: the manifest's "settings" (every setting the images depend on, plus
            `img_total`); two folders are parts of one data set when these are equal.
        keep_size: also keep the images at this size (the model's) in `{folder}_{size}px`.
        trained_on: what the generator's checkpoints record of their real training data (how it
            was verified, the training subset); written to the manifest as "trained_on".
    """

    def __init__(self, folder, spec, counts, settings, keep_size=None, trained_on=None):
        self.folder = Path(folder)
        self.trained_on = trained_on
        self.spec = spec
        self.counts = list(counts)
        self.settings = dict(settings)
        self.keep_dir = self.folder.with_name(f"{self.folder.name}_{keep_size}px") if keep_size else None
        self.keep_size = keep_size

    @property
    def manifest_path(self):
        return self.folder / MANIFEST

    def check_folder(self):
        """A DataError when the folder holds another data set. Writes nothing."""
        manifest = read_manifest(self.folder)
        if manifest is not None and same_settings(manifest.get("settings"), self.settings):
            self.settings = manifest["settings"]  # as the other parts wrote them
        elif manifest is not None:
            stored = manifest.get("settings") or {}
            diff = [k for k in sorted(set(stored) | set(self.settings)) if stored.get(k) != self.settings.get(k)]
            raise DataError(f"{self.folder} holds a data set made with other settings ({', '.join(diff)} differ: "
                            f"{', '.join(f'{k}={stored.get(k)!r}' for k in diff)}); use another --out_dir")
        if manifest is None and self.folder.exists() and any(self.folder.glob("class_*")):
            raise DataError(f"{self.folder} holds class folders but no {MANIFEST}; use another --out_dir")

    def missing(self, label, n):
        """Whether image n of class `label` still has to be written (absent or not whole)."""
        if not is_complete_png(image_path(self.folder, label, n), self.spec.image_size):
            return True
        return self.keep_dir is not None and not is_complete_png(image_path(self.keep_dir, label, n),
                                                                 self.keep_size)

    def remove_stale_temporaries(self):
        remove_stale_temporaries(self.folder, self.keep_dir)

    def _header(self, checkpoints):
        return {"settings": self.settings, "img_total": sum(self.counts), "per_class": self.counts,
                "resize_method": RESIZE_METHOD, "checkpoints": checkpoints,
                "label_names": list(self.spec.label_names), "layout": LAYOUT,
                **({"trained_on": self.trained_on} if self.trained_on is not None else {})}

    def begin(self, checkpoints):
        """Marks the data set as being written (complete: false) before the first image."""
        merge_json(self.manifest_path, {**self._header(checkpoints), "versions": software_versions(), "complete": False})

    def write(self, images, labels, indices):
        """Writes images (uint8, at the model's size) at the native size, and at the model's when kept."""
        small = resize_images(images, self.spec.image_size)
        for image, big, label, n in zip(small, images, labels, indices):
            write_png(image_path(self.folder, label, n), image, self.spec.channels)
            if self.keep_dir is not None:
                write_png(image_path(self.keep_dir, label, n), big, self.spec.channels)

    def finish(self, part, part_images, checkpoints, grid_per_class=8, title=""):
        """Counts what is on disk, records it and this part (`part_images` images) in the manifest,
        draws samples.png.

        Returns (images on disk per class, whether the whole data set is complete).
        """
        on_disk = count_existing(self.folder, self.counts, self.spec.image_size)
        complete = on_disk == self.counts
        merge_json(self.manifest_path, {**self._header(checkpoints), "complete": complete,
                                        "counts_on_disk": on_disk, "parts": {part: {"images": part_images, "done": True}}})
        if grid_per_class:
            self.save_grid(grid_per_class, title)
        return on_disk, complete

    def save_grid(self, per_class, title):
        """samples.png: the first `per_class` whole images of each class."""
        import numpy as np
        from PIL import Image

        from Data.images import save_image_grid

        images, labels = [], []
        for c, count in enumerate(self.counts):
            for n in range(min(per_class, count)):
                path = image_path(self.folder, c, n)
                if is_complete_png(path, self.spec.image_size):
                    with Image.open(path) as image:
                        images.append(np.asarray(image.convert("RGB")))
                    labels.append(c)
        if images:
            save_image_grid(np.stack(images), np.array(labels), self.spec.label_names,
                            self.folder / "samples.png", per_class=per_class, title=title)
