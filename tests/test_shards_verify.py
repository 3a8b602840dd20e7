"""Data/shards.py and generate_dataset.py --verify: parts from several machines make one data set.

The hand-made parts are real PNG files and manifests in generate_dataset.py's
layout; the last test generates real parts with a tiny model as a SLURM array
would, verifies them, and has the CAS stage refuse one part alone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Data import shards
from Data.errors import DataError

REPO = Path(__file__).resolve().parent.parent
SIZE = 8
COUNTS = [3, 2]  # class 0: img_0..2, class 1: img_0..1


def _write_part(folder, shard, num_shards, counts=COUNTS, settings=None):
    """The images n % num_shards == shard of a 2-class set, each with its own pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"settings": {"dataset": "toy", "native_size": SIZE, "seed": 0, **(settings or {})},
                "per_class": list(counts)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for c, count in enumerate(counts):
        for n in range(shard, count, num_shards):
            _write_png(shards.image_path(folder, c, n), value=10 * c + n)
    return folder


def _write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), value, np.uint8), mode="L").save(path)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "3"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "4"}, (0, 4)),  # --array=1-4
    ({"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "3", "SGE_TASK_STEPSIZE": "1"}, (2, 3)),
    ({"SGE_TASK_ID": "undefined"}, None),  # a Grid Engine job that is not an array
])
def test_shard_from_the_array_jobs_variables(environ, expected):
    assert shards.shard_from_environment(environ) == expected


@pytest.mark.parametrize("environ, message", [
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "6"}, "has 2 tasks, not 7"),  # --array=0-6:6 skips parts
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not an integer"),
    ({"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "5", "SGE_TASK_STEPSIZE": "2"}, "step 2"),
])
def test_arrays_that_would_skip_parts_are_refused(environ, message):
    with pytest.raises(DataError, match=message):
        shards.shard_from_environment(environ)


def test_parts_in_one_or_several_folders_verify(tmp_path):
    parts = [_write_part(tmp_path / f"part{k}", k, 2) for k in range(2)]
    summary = shards.verify_parts(parts)
    assert summary["images"] == 5 and summary["per_class"] == COUNTS
    shared = tmp_path / "shared"
    for k in range(2):
        _write_part(shared, k, 2)
    assert shards.verify_parts([shared])["images"] == 5


def _broken(tmp_path, how):
    parts = [_write_part(tmp_path / f"part{k}", k, 2) for k in range(2)]
    if how == "missing":
        shards.image_path(parts[1], 0, 1).unlink()
    elif how == "twice":
        _write_png(shards.image_path(parts[0], 0, 1), value=1)
    elif how == "stray":
        _write_png(shards.image_path(parts[0], 1, 7), value=99)
    elif how == "truncated":
        path = shards.image_path(parts[0], 1, 0)
        path.write_bytes(path.read_bytes()[:30])
    elif how == "same_pixels":
        _write_png(shards.image_path(parts[1], 1, 1), value=0)  # as class 0's img_0
    elif how == "other_settings":
        _write_part(parts[1], 1, 2, settings={"seed": 1})
    return parts


@pytest.mark.parametrize("how, message", [
    ("missing", r"class 0 has 2 of 3 images \(img_1.png missing\)"),
    ("twice", "class 0 image 1 is in both"),
    ("stray", "img_7.png is not in the data set"),
    ("truncated", "img_0.png is not a whole 8x8 PNG"),
    ("same_pixels", "has the same pixels as"),
    ("other_settings", "seed=0 vs 1"),
])
def test_parts_that_are_not_one_data_set_are_refused(tmp_path, how, message):
    with pytest.raises(DataError, match=message):
        shards.verify_parts(_broken(tmp_path, how))


def test_one_part_alone_is_incomplete_for_the_cas_stage(tmp_path):
    part = _write_part(tmp_path / "part0", 0, 2)
    with pytest.raises(DataError, match="not a complete generated data set.*generate_dataset.py --verify"):
        shards.require_complete(part)
    shards.require_complete(tmp_path)  # another implementation's folder (no manifest): not judged here


def _run(script, *args, root, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGE_"))}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=root,
                          env=dict(environ, SDDG_OUTPUT_ROOT=str(root), **(env or {})),
                          capture_output=True, text=True, timeout=600)


def _last_error(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_slurm_array_writes_parts_that_verify(tiny_checkpoints, tmp_path):
    root = tiny_checkpoints
    common = ["--dataset", "digits", "--preset", "tiny", "--enc_epoch", "2", "--dif_epoch", "0", "--inf_steps", "3",
              "--img_total", "20", "--batch_size", "10", "--grid_per_class", "0"]
    parts = [tmp_path / f"machine{k}" for k in range(2)]
    for k, part in enumerate(parts):  # --array=1-2: tasks 1 and 2 are shards 0/2 and 1/2
        slurm = {"SLURM_ARRAY_TASK_ID": str(k + 1), "SLURM_ARRAY_TASK_COUNT": "2",
                 "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2"}
        done = _run("generate_dataset.py", *common, "--out_dir", part, root=root, env=slurm)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"({k}/2)" in done.stdout
        assert sorted(p.name for p in (part / "class_00").glob("*.png")) == [f"img_{k}.png"]

    done = _run("generate_dataset.py", "--verify", *parts, root=root)
    assert done.returncode == 0 and "verified: 20 images" in done.stdout, done.stderr[-3000:]
    done = _run("generate_dataset.py", "--verify", parts[0], root=root)
    assert done.returncode == 2 and len(_last_error(done.stderr)) == 1
    assert "class 0 has 1 of 2 images (img_1.png missing)" in done.stderr

    done = _run("classifier_training.py", "--dataset", "digits", "--synthetic_dir", parts[0], "--epochs", "1",
                root=root)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(_last_error(done.stderr)) == 1 and "not a complete generated data set" in done.stderr
    assert not (root / "Checkpoints" / "Classifiers").exists()
