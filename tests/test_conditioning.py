"""The conditioning methods (class encoder, text, textual inversion) behind one interface, at tiny size.

Needs CLIP's vocabulary file (an installed open-clip-torch has it: requirements-dev.txt).
"""

import dataclasses

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
