"""generate_dataset.py keeps the paper's flags: names, meanings and defaults.

The paper: `--img_class` is the number of images per class, `--img_total` the
alternative total; `--enc_epoch 50`, `--dif_epoch 10`, `--inf_steps 50`,
`--ugs 7.5` for Stable Diffusion (read here from the preset, the one place they
are declared), generation batches of 250, `--exp` an identifier kept as
written. Our class selection is `--only_class`. Nothing here loads a model.
"""

import pytest

import generate_dataset
from Data.registry import get_spec
from Models.diffusion import checkpoints as ck
from Models.diffusion.presets import get_preset
from Pipeline.generate import SCRIPT, GenerateSettings, is_done, run
from Utils.cli import UserError
from Utils.io import atomic_write_json


def parse(*words):
    return GenerateSettings.from_namespace(generate_dataset.parser.parse_args(list(words)))


def test_paper_defaults():
    s = parse()
    assert (s.dataset, s.batch_size, s.exp, s.preset) == ("cifar10", 250, "0", "sd1")
    r = parse("--img_total", "100").resolved()
    sd1 = get_preset("sd1")
    assert (sd1.enc_epochs, sd1.dif_epochs, sd1.default_inference_steps, sd1.default_guidance_scale) == (50, 10, 50, 7.5)
    assert (r.enc_epoch, r.dif_epoch, r.inf_steps, r.ugs) == (50, 10, 50, 7.5)
    for preset in ("sd2", "tiny", "small"):  # every preset documents its own defaults
        p = get_preset(preset)
        r = parse("--img_total", "100", "--preset", preset).resolved()
        assert (r.enc_epoch, r.dif_epoch, r.inf_steps, r.ugs) == (
            p.enc_epochs, p.dif_epochs, p.default_inference_steps, p.default_guidance_scale)


def test_img_class_is_images_per_class_and_img_total_the_alternative():
    r = parse("--dataset", "digits", "--img_class", "7").resolved()
    assert r.img_total == 70 and r.img_class is None
    assert parse("--dataset", "digits", "--img_total", "43").resolved().img_total == 43
    # Neither: x1, the size of the real training split (digits is embedded: no download).
    assert parse("--dataset", "digits").resolved().img_total == 1077
    with pytest.raises(UserError, match="--img_class .* or --img_total .* not both"):
        parse("--img_class", "7", "--img_total", "70")


def test_default_size_without_the_real_data_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_DATA_MIRROR", "file:///nonexistent-mirror")
    with pytest.raises(UserError, match="as large as the real training split, which needs the real data"):
        parse("--dataset", "retinamnist", "--data_dir", str(tmp_path)).resolved()


def test_exp_is_kept_as_written_and_the_command_reruns():
    s = parse("--dataset", "digits", "--exp", "0001", "--img_class", "5", "--preset", "tiny")
    assert s.exp == "0001" and s.output_folder().parts[-2:] == ("Exp_0001", "digits")
    r = s.resolved()
    assert GenerateSettings.from_argv(r.to_argv()) == r
    assert r.command(SCRIPT).startswith("python generate_dataset.py --dataset digits --img_total 50")


def test_only_class_is_the_class_selection():
    assert parse("--only_class", "3").only_class == 3


@pytest.fixture
def root(tmp_path, monkeypatch):
    """Checkpoint folders that list enc epochs 1 and 2 (names only: nothing is loaded)."""
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    spec = get_spec("digits")
    enc_dir = ck.diffusion_checkpoint_dir("0", "digits", "enc")
    atomic_write_json(enc_dir / ck.SETTINGS_FILE, {**ck.model_identity("tiny", spec, True, 0), "stage": "enc"})
    for epoch in (1, 2):
        ck.weights_path(enc_dir, epoch).write_bytes(b"")
    return tmp_path


def test_a_default_epoch_without_checkpoint_names_the_ones_that_exist(root):
    base = ("--dataset", "digits", "--preset", "tiny", "--img_total", "20")
    with pytest.raises(UserError, match=r"--enc_epoch defaults to preset tiny's 15, .*epochs there: 1, 2"):
        run(parse(*base))
    with pytest.raises(UserError, match=r"--dif_epoch defaults to preset tiny's 5, .*epochs there: none.*"
                                        r"pass --dif_epoch \(0: the UNet without fine-tuning\)"):
        run(parse(*base, "--enc_epoch", "2"))
    assert not (root / "Data").exists()
    assert is_done(parse(*base, "--enc_epoch", "2")) is None
