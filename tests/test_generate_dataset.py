"""generate_dataset.py: layout, manifest, resume after a kill, shards, bad input.

The checkpoints here are made without training (a `tiny` model saved as the
enc stage would save it): generation does not care whether the weights are
good, only that they are the ones named.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import generate_dataset  # noqa: E402
from Data.registry import get_spec  # noqa: E402
from Models.diffusion import checkpoints as ck  # noqa: E402
from Data.errors import DataError  # noqa: E402
from Utils.errors import InputError  # noqa: E402
from Utils.io import atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An output root with a tiny digits enc checkpoint (epoch 2) and dif checkpoint (epoch 1)."""
    root = tmp_path_factory.mktemp("gen")
    old = os.environ.get("SDDG_OUTPUT_ROOT")
    os.environ["SDDG_OUTPUT_ROOT"] = str(root)
    spec = get_spec("digits")
    model = ck.build_model("tiny", spec, init_seed=0)
    identity = ck.model_identity("tiny", spec, True, 0)
    enc_dir = ck.diffusion_checkpoint_dir(0, "digits", "enc")
    atomic_write_json(enc_dir / ck.SETTINGS_FILE, {**identity, "stage": "enc"})
    ck.save_parts(ck.weights_path(enc_dir, 2), ck.enc_parts(model))
    dif_dir = ck.diffusion_checkpoint_dir(0, "digits", "dif")
    atomic_write_json(dif_dir / ck.SETTINGS_FILE, {**identity, "stage": "dif", "enc_epoch": 2})
    for w in model.unet.weights[-2:]:  # a "fine-tuned" UNet: a different output layer
        w.assign(w.numpy() + 0.05)
    ck.save_parts(ck.weights_path(dif_dir, 1), {"unet": model.unet})
    yield root
    if old is None:
        os.environ.pop("SDDG_OUTPUT_ROOT", None)
    else:
        os.environ["SDDG_OUTPUT_ROOT"] = old


COMMON = ["--dataset", "digits", "--preset", "tiny", "--enc_epoch", "2", "--dif_epoch", "0", "--inf_steps", "12",
          "--ugs", "2.5",
          "--batch_size", "2", "--seed", "3", "--img_total", "43"]
# 43 over 10 classes: 5 for classes 0-2, 4 for the rest.
COUNTS = [5, 5, 5] + [4] * 7


def files_of(folder):
    """{relative path: bytes} of every PNG under class folders."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("class_*/*.png"))}


def error_lines(stderr):
    """stderr without TensorFlow's own start-up log lines (absl / C++ logging)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith("WARNING: All log messages")
            and not re.match(r"^[IWEF]\d{4} ", line)]


@pytest.fixture(scope="module")
def reference(root):
    """One uninterrupted, unsharded run: what every other way of running must reproduce."""
    out = root / "reference"
    assert generate_dataset.main(COMMON + ["--out_dir", str(out)]) == 0
    return out


def test_layout_and_manifest(reference):
    files = files_of(reference)
    assert set(files) == {f"class_{c:02d}/img_{n}.png" for c in range(10) for n in range(COUNTS[c])}
    for name in files:
        with Image.open(reference / name) as image:
            assert image.size == (8, 8) and image.mode == "L"  # digits are grey: so are the PNGs
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["img_total"] == 43
    assert manifest["counts_on_disk"] == COUNTS and manifest["per_class"] == COUNTS
    assert manifest["settings"]["inf_steps"] == 12 and manifest["settings"]["ugs"] == 2.5
    assert manifest["checkpoints"]["enc"].endswith("epoch_002.weights.h5")
    assert manifest["checkpoints"]["dif"] is None
    assert "antialiased" in manifest["resize_method"] and "keras" in manifest["versions"]
    assert (reference / "samples.png").exists()
    # Different images per class and per index (the noise depends on both).
    assert files["class_00/img_0.png"] != files["class_00/img_1.png"]
    assert files["class_00/img_0.png"] != files["class_01/img_0.png"]


def test_shards_and_classes_fill_one_folder_with_the_same_data_set(root, reference):
    out = root / "sharded"
    # Other batch size; shard 0/2, then class 1 of shard 1/2, then the rest of shard 1/2.
    for extra in (["--shard", "0/2"], ["--shard", "1/2", "--only_class", "1"], ["--shard", "1/2"]):
        assert generate_dataset.main(COMMON + ["--out_dir", str(out), "--batch_size", "5"] + extra) == 0
        complete = json.loads((out / "manifest.json").read_text())["complete"]
        assert complete is (extra == ["--shard", "1/2"])
    assert files_of(out) == files_of(reference)


def test_fine_tuned_unet_and_other_settings_into_the_same_folder(root, reference):
    with pytest.raises(DataError, match="other settings"):
        generate_dataset.main(COMMON + ["--out_dir", str(reference), "--dif_epoch", "1"])
    tuned = root / "tuned"
    assert generate_dataset.main(COMMON + ["--out_dir", str(tuned), "--dif_epoch", "1",
                                           "--keep_generation_size"]) == 0
    assert json.loads((tuned / "manifest.json").read_text())["checkpoints"]["dif"].endswith("epoch_001.weights.h5")
    assert files_of(tuned).keys() == files_of(reference).keys()
    assert files_of(tuned) != files_of(reference)
    # --keep_generation_size: the model-size images beside (tiny works at the native 8 px).
    assert files_of(root / "tuned_8px") == files_of(tuned)


def test_killed_run_resumes_to_the_same_data_set(root, reference):
    out = root / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, str(REPO / "generate_dataset.py"), *COMMON, "--out_dir", str(out)]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Whole images only: counting the hidden temporary file of an image being written would kill
    # the run inside that write, and its fresh temporary file is rightly kept (another worker's?).
    while time.time() < deadline and len(list(out.glob("class_*/img_*.png"))) < 4:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(out.glob("class_*/*.png")))
    assert 4 <= written < 43, f"the run was not killed part-way ({written} images)"
    # A truncated image (as from a disk filling up) and a stale temporary file.
    victim = sorted(out.glob("class_*/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:20])
    leftover = victim.parent / ".img_99.abcd.tmp.png"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 3600,) * 2)  # from a run killed an hour ago

    assert generate_dataset.main(COMMON + ["--out_dir", str(out)]) == 0
    assert files_of(out) == files_of(reference)
    assert not list(out.glob("class_*/.*"))
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_bad_input_is_one_line_and_writes_nothing(root, run_script):
    out = root / "never"
    result = run_script("generate_dataset.py", *COMMON, "--shard", "3/2", "--out_dir", out, cwd=root)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == ["error: --shard 3/2: need N >= 1 and 0 <= K < N"]
    for argv, message in [
        (["--dataset", "nosuch"], "unknown dataset"),
        (["--enc_epoch", "7"], "no class-encoder checkpoint for epoch 7"),
        (["--dif_epoch", "4"], "no fine-tuned UNet checkpoint for epoch 4"),
        (["--preset", "sd1"], "made with preset='tiny'"),
        (["--only_class", "10"], "--only_class"),
        (["--img_total", "9"], "fewer than digits's 10 classes"),
        (["--inf_steps", "1000"], "inference steps"),
    ]:
        with pytest.raises(InputError, match=message):
            generate_dataset.main(COMMON + ["--out_dir", str(out)] + argv)
    with pytest.raises(SystemExit) as exit_info:
        generate_dataset.main(COMMON + ["--img_total", "0", "--out_dir", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()


def test_the_stage_function_and_is_done(root, reference):
    """Pipeline/generate.py: the same data set through run(settings); is_done reads the manifest."""
    from Pipeline.generate import GenerateSettings, is_done, run

    settings = GenerateSettings.from_argv(COMMON + ["--out_dir", str(reference)])
    assert is_done(settings) == f"43 images generated in {reference}"
    assert is_done(settings.replace(ugs=2.0)) is None and is_done(settings.replace(img_total=44)) is None
    result = run(settings, log=lambda line: None)
    assert result.written == 0 and result.complete and result.in_part == 43
    assert list(result.per_class) == COUNTS and list(result.on_disk) == COUNTS
    assert result.checkpoints["enc"].endswith("epoch_002.weights.h5") and result.out_dir == reference
    assert GenerateSettings.from_argv(result.settings.to_argv()) == result.settings
    incomplete = root / "sharded_alone"
    run(settings.replace(out_dir=str(incomplete), shard="0/2"), log=lambda line: None)
    assert is_done(settings.replace(out_dir=str(incomplete))) is None
    # --img_class: images per class; 4 per class is another data set than 43 in all.
    per_class = GenerateSettings.from_argv([a for a in COMMON if a not in ("--img_total", "43")]
                                           + ["--img_class", "4", "--out_dir", str(root / "per_class")])
    done = run(per_class, log=lambda line: None)
    assert done.img_total == 40 and list(done.per_class) == [4] * 10 and done.complete
    same = files_of(reference)
    assert all(same[name] == data for name, data in files_of(root / "per_class").items())
