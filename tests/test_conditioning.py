"""The conditioning methods (class encoder, text, textual inversion) behind one interface, at tiny size.

Needs CLIP's vocabulary file (an installed open-clip-torch has it: requirements-dev.txt).
"""

import dataclasses
import json

import keras
import numpy as np
import pytest

from Data.registry import get_spec
from Models.diffusion import checkpoints as ck
from Models.diffusion.conditioning import (DEFAULT_TEMPLATES, ConditioningSpec, read_templates,
                                           template_choices)
from Models.diffusion.optimizer import make_optimizer
from Models.diffusion.presets import get_preset
from Models.diffusion.trainer import TrainBatches
from Models.errors import ModelSettingsError


@pytest.fixture(scope="module", autouse=True)
def vocabulary():
    from Models.errors import CheckpointError
    from Models.text.clip_tokenizer import vocabulary_path

    try:
        return vocabulary_path()
    except CheckpointError as e:
        from tests.conftest import require_module

        require_module("open_clip_vocabulary_missing")  # skips locally, fails under CI=true
        raise e


def digits_batch(n=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), np.arange(n) % 10


@pytest.mark.parametrize("method", ["text", "textual_inversion"])
def test_text_methods_give_contexts_and_same_seed_same_images(method):
    spec = get_spec("digits")
    model = ck.build_model("tiny", spec, conditioning=ConditioningSpec(method))
    context, uncond = model.contexts([0, 1, 2], indices=[0, 0, 0], seed=0)
    length = get_preset("tiny").text.max_length
    assert tuple(context.shape) == (3, length, 64) and tuple(uncond.shape) == (1, length, 64)
    assert model.unet.inputs[2].shape[1] == length
    a = model.generate([0, 1, 1], num_steps=2, seed=3, batch_size=2)
    b = model.generate([0, 1, 1], num_steps=2, seed=3, batch_size=3)
    np.testing.assert_array_equal(a, b)


def test_template_draws_follow_seed_class_and_index():
    first = template_choices(0, [0, 0, 1], [0, 1, 0], 8)
    np.testing.assert_array_equal(first, template_choices(0, [0, 0, 1], [0, 1, 0], 8))
    many = template_choices(0, [0] * 64, range(64), 8)
    assert len(set(many.tolist())) > 4
    assert not np.array_equal(many, template_choices(1, [0] * 64, range(64), 8))


def test_text_prompts_name_the_labels():
    spec = get_spec("digits")
    backbone = ck.build_backbone("tiny", spec, conditioning=ConditioningSpec("text", ("a photo of a {label}.",)))
    assert backbone.conditioning.prompts([3], [0]) == [f"a photo of a {spec.label_names[3]}."]
    ti = ck.build_backbone("tiny", spec, conditioning=ConditioningSpec("textual_inversion", ti_tokens=2))
    assert ti.conditioning.prompts([3], [0]) == ["a photo of a <class-3-0> <class-3-1>."]


def test_textual_inversion_trains_only_the_new_embeddings():
    # A "pretrained" tiny: the UNet is frozen in the enc stage, as sd1's.
    preset = dataclasses.replace(get_preset("tiny"), pretrained=True)
    spec = get_spec("digits")
    model = ck.build_model(preset, spec, conditioning=ConditioningSpec("textual_inversion"),
                           random_init=True)
    trained = model.conditioning.new_tokens.embeddings
    assert [v.path for v in model.trainable_variables] == [trained.path]
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.backbone.weights}
    images, labels = digits_batch()
    model.compile(optimizer=make_optimizer(1e-2, total_steps=4))
    model.fit(TrainBatches(images, labels, batch_size=4, image_size=8), epochs=2, shuffle=False, verbose=0)
    changed = [path for path, value in before.items()
               if not np.array_equal(value, keras.ops.convert_to_numpy(
                   next(v for v in model.backbone.weights if v.path == path)))]
    assert changed == [trained.path]
    assert set(ck.enc_parts(model)) == {"textual_inversion"}


def test_class_encoder_is_the_default_and_unchanged():
    spec = get_spec("digits")
    model = ck.build_model("tiny", spec)
    assert model.conditioning.method == "class_encoder" and model.class_encoder is not None
    assert ck.model_identity("tiny", spec, True, 0)["conditioning"] == "class_encoder"
    assert "prompt_templates" not in ck.model_identity("tiny", spec, True, 0)


def test_templates_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# mine\na drawing of a {label}\n\nthe {label}, in colour\n")
    assert read_templates(path) == ("a drawing of a {label}", "the {label}, in colour")
    path.write_text("no placeholder here\n")
    with pytest.raises(ModelSettingsError, match="exactly once"):
        read_templates(path)
    with pytest.raises(ModelSettingsError, match="unknown conditioning"):
        ConditioningSpec("lora")
    assert ConditioningSpec.from_record({}) == ConditioningSpec()
    assert ConditioningSpec.from_record(ConditioningSpec("text").record()).templates == DEFAULT_TEMPLATES


def test_text_on_a_pretrained_preset_needs_no_enc_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    pretrained = dataclasses.replace(get_preset("tiny"), pretrained=True)
    spec = get_spec("digits")
    text = ConditioningSpec("text")
    assert not ck.needs_enc_checkpoint(pretrained, text)
    assert ck.needs_enc_checkpoint(pretrained, ConditioningSpec("textual_inversion"))
    assert ck.needs_enc_checkpoint(get_preset("tiny"), text)  # from scratch: the enc stage trains the UNet
    settings, used = ck.resolve_generation_checkpoints(pretrained, spec, "0", 50, 0, text)
    assert used == {"enc": None, "dif": None} and settings["conditioning"] == "text"
    assert not any(tmp_path.iterdir())


# ----- the ordinal class encoder (graded classes) ----------------------------------------------
def test_ordinal_codes_are_thermometer_codes_and_the_zero_code_stays_unconditional():
    from keras import ops

    spec = get_spec("retinamnist")  # five retinopathy grades
    keras.utils.set_random_seed(0)
    ordinal = ck.build_model("tiny", spec, init_seed=0, conditioning=ConditioningSpec("ordinal_class_encoder"))
    keras.utils.set_random_seed(0)
    one_hot = ck.build_model("tiny", spec, init_seed=0)
    assert ordinal.conditioning.method == "ordinal_class_encoder" and ordinal.class_encoder is not None
    codes = ops.convert_to_numpy(ordinal.conditioning.label_codes(np.array([0, 1, 4, 2])))
    np.testing.assert_array_equal(codes, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(ops.convert_to_numpy(one_hot.conditioning.label_codes(np.array([0, 1, 4, 2]))),
                                  np.eye(5)[[0, 1, 4, 2]])

    # The same class encoder weights: grade 0's code is its one-hot, so only the higher grades move, and
    # each grade's context is the encoder of its code; the unconditional context is the zero code's.
    for a, b in zip(ordinal.class_encoder.weights, one_hot.class_encoder.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    context, uncond = ordinal.contexts([0, 3])
    plain, plain_uncond = one_hot.contexts([0, 3])
    context, plain = ops.convert_to_numpy(context), ops.convert_to_numpy(plain)
    np.testing.assert_allclose(context[0], plain[0], rtol=1e-6, atol=1e-7)
    assert np.abs(context[1] - plain[1]).max() > 1e-3
    grade_3 = ordinal.class_encoder(ops.convert_to_tensor(np.array([[1, 1, 1, 1, 0]], "float32")))
    np.testing.assert_allclose(context[1], ops.convert_to_numpy(grade_3)[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ops.convert_to_numpy(uncond), ops.convert_to_numpy(plain_uncond))

    # Training: a dropped label (keep False) trains on the zero code, the unconditional context.
    keep = ops.convert_to_tensor(np.array([[True], [False]]))
    trained = ops.convert_to_numpy(ordinal.conditioning.training_context(
        ops.convert_to_tensor(np.array([3, 3], "int32")), keep, None))
    np.testing.assert_allclose(trained[0], context[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(trained[1], ops.convert_to_numpy(uncond)[0], rtol=1e-6, atol=1e-7)

    # Recorded as its own method: a class-encoder checkpoint is not an ordinal one.
    ordinal_identity = ck.model_identity("tiny", spec, True, 0, conditioning=ConditioningSpec("ordinal_class_encoder"))
    assert ordinal_identity["conditioning"] == "ordinal_class_encoder"
    assert ordinal_identity != ck.model_identity("tiny", spec, True, 0)
    assert ConditioningSpec.from_record(ordinal_identity) == ConditioningSpec("ordinal_class_encoder")


def test_ordinal_class_encoder_trains_generates_and_refuses_the_other_code(tmp_path, monkeypatch, retinamnist_dir):
    """SD_adapting.py trains with it (one epoch on a 40-image subset of RetinaMNIST's grades), generate_dataset.py
    writes images from that checkpoint and records the method, and the one-hot class encoder refuses it."""
    import SD_adapting
    import generate_dataset
    from Utils.errors import InputError

    data_dir = retinamnist_dir
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    common = ["--dataset", "retinamnist", "--data_dir", str(data_dir), "--preset", "tiny", "--train_subset", "40",
              "--verbose", "0"]
    assert SD_adapting.main(common + ["--train_model", "enc", "--epochs", "1", "--batch_size", "20",
                                      "--grid_per_class", "0", "--conditioning", "ordinal_class_encoder"]) == 0
    folder = ck.diffusion_checkpoint_dir(0, "retinamnist", "enc")
    assert json.loads((folder / ck.SETTINGS_FILE).read_text())["conditioning"] == "ordinal_class_encoder"
    out = tmp_path / "generated"
    generate = common[:-2] + ["--enc_epoch", "1", "--dif_epoch", "0", "--inf_steps", "2", "--ugs", "1.5",
                              "--img_total", "10", "--batch_size", "10", "--grid_per_class", "0", "--out_dir", str(out)]
    assert generate_dataset.main(generate + ["--conditioning", "ordinal_class_encoder"]) == 0
    assert len(list(out.glob("class_*/*.png"))) == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["conditioning"] == "ordinal_class_encoder"
    with pytest.raises(InputError, match="conditioning"):
        generate_dataset.main(generate[:-1] + [str(tmp_path / "one_hot")])
    assert not (tmp_path / "one_hot").exists()
