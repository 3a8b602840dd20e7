"""The from-scratch training recipe: schedules, v-prediction, min-SNR weights, EMA, grey data, JAX."""

import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from Models.diffusion.optimizer import (FLAT_STATE_MAX_STEPS, AdamWithEMA, PaperAdam, ema_optimizer, load_optimizer_state,
                                       make_optimizer, optimizer_state)
from Models.diffusion.schedule import NoiseSchedule, ScheduleError

REPO = Path(__file__).resolve().parent.parent


def numpy(x):
    return ops.convert_to_numpy(x)


# ----- schedules -----------------------------------------------------------------------------
def test_beta_schedules_match_their_formulas():
    linear = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(linear.betas, np.linspace(1e-4, 0.02, 1000))
    cosine = NoiseSchedule("squaredcos_cap_v2")
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cosine.alphas_cumprod[:-1], (f[1:] / f[0])[:-1], rtol=1e-6)
    assert cosine.betas.max() <= 0.999
    # Stable Diffusion's scaled_linear leaves sqrt(alpha_bar_T) ~ 0.068 of the image at the last step.
    assert np.sqrt(NoiseSchedule().alphas_cumprod[-1]) == pytest.approx(0.068, abs=0.001)


def test_zero_terminal_snr_rescale():
    base = NoiseSchedule("scaled_linear")
    rescaled = NoiseSchedule("scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert rescaled.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    assert rescaled.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0])
    assert np.all(np.diff(rescaled.alphas_cumprod) < 0)
    with pytest.raises(ScheduleError, match="v_prediction"):
        NoiseSchedule(rescale_betas_zero_snr=True)  # epsilon cannot be learnt where alpha_bar is 0


def test_timestep_spacings_match_diffusers_definitions():
    assert list(NoiseSchedule(timestep_spacing="trailing").ddim_timesteps(4)) == [999, 749, 499, 249]
    assert list(NoiseSchedule(timestep_spacing="linspace").ddim_timesteps(4)) == [999, 666, 333, 0]
    assert list(NoiseSchedule().ddim_timesteps(4)) == [751, 501, 251, 1]


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_v_and_epsilon_parameterisations_give_the_same_x0(beta_schedule):
    rng = np.random.default_rng(0)
    x0 = ops.convert_to_tensor(rng.uniform(-1, 1, (4, 5, 5, 1)), "float32")
    noise = ops.convert_to_tensor(rng.standard_normal((4, 5, 5, 1)), "float32")
    timesteps = np.array([0, 10, 500, 990])
    eps_schedule = NoiseSchedule(beta_schedule)
    v_schedule = NoiseSchedule(beta_schedule, prediction_type="v_prediction")
    x_t = eps_schedule.add_noise(x0, noise, timesteps)
    alpha_bar = eps_schedule.alphas_cumprod[timesteps].astype("float32").reshape(-1, 1, 1, 1)
    # A perfect model of each kind outputs its training target.
    x0_from_eps, eps_from_eps = eps_schedule.split_prediction(
        eps_schedule.training_target(x0, noise, timesteps), x_t, alpha_bar)
    x0_from_v, eps_from_v = v_schedule.split_prediction(
        v_schedule.training_target(x0, noise, timesteps), x_t, alpha_bar)
    np.testing.assert_allclose(numpy(x0_from_v), numpy(x0), atol=2e-5)
    np.testing.assert_allclose(numpy(eps_from_v), numpy(noise), atol=2e-5)
    np.testing.assert_allclose(numpy(x0_from_eps[1:]), numpy(x0[1:]), atol=2e-3)  # 1/sqrt(a) amplifies rounding
    np.testing.assert_allclose(numpy(eps_from_eps), numpy(noise), atol=1e-6)
    # And v itself: sqrt(a) * noise - sqrt(1 - a) * x0.
    v = numpy(v_schedule.training_target(x0, noise, timesteps))
    np.testing.assert_allclose(v, np.sqrt(alpha_bar) * numpy(noise) - np.sqrt(1 - alpha_bar) * numpy(x0),
                               atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    schedule = NoiseSchedule("squaredcos_cap_v2", prediction_type=prediction_type)
    timesteps = np.array([0, 5, 100, 400, 800, 999])
    snr = schedule.snr(timesteps)
    gamma = 5.0
    expected = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    np.testing.assert_allclose(numpy(schedule.snr_weights(timesteps, gamma)), expected, rtol=1e-4)
    assert snr[0] > gamma > snr[-1]  # the cap is active at small t and not at large t


# ----- EMA -------------------------------------------------------------------------------------
def test_ema_warm_up_and_averaged_weights():
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer = AdamWithEMA(learning_rate=0.1, use_ema=True, ema_momentum=0.999)
    optimizer.build([variable])
    averages, values = [], []
    for step in range(4):
        optimizer.apply([ops.ones(3)], [variable])
        values.append(numpy(variable).copy())
        averages.append(numpy(optimizer.moving_averages([variable])[0]).copy())
    # Step 0 copies the weights; step t then decays by min(0.999, (1 + t) / (10 + t)).
    expected = values[0]
    np.testing.assert_allclose(averages[0], expected, rtol=1e-6)
    for t in range(1, 4):
        decay = min(0.999, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * values[t]
        np.testing.assert_allclose(averages[t], expected, rtol=1e-5)
    with optimizer.averaged_weights([variable]):
        np.testing.assert_allclose(numpy(variable), averages[-1])
    np.testing.assert_allclose(numpy(variable), values[-1])  # restored afterwards
    assert ema_optimizer(optimizer) is optimizer and ema_optimizer(make_optimizer(1e-3, 10)) is None

    # Without the warm-up (fine-tuning from an average): the full decay from the first update.
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer = make_optimizer(0.1, 10, ema_decay=0.9, ema_warmup=False)
    optimizer.build([variable])
    assert AdamWithEMA.from_config(optimizer.get_config()).ema_warmup is False
    for step in range(3):
        optimizer.apply([ops.ones(3)], [variable])
        expected = numpy(variable).copy() if step == 0 else 0.9 * expected + 0.1 * numpy(variable)
        np.testing.assert_allclose(numpy(optimizer.moving_averages([variable])[0]), expected, rtol=1e-5)


class PerVariableState(AdamWithEMA):
    """AdamWithEMA with Keras' one state slot per variable (each updated on its own, the scalars once)."""

    flat_state = False


class KerasOwnStep(PerVariableState):
    """AdamWithEMA with Keras' own step and state: every scalar computed again for each variable."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        keras.optimizers.Adam._backend_apply_gradients(self, grads, trainable_variables)


OPTIMIZER_SHAPES = [(3, 3, 4, 8), (8,), (16, 8), (8,)] * 5


def _optimizer_run(optimizer_class, ema_decay, steps=4, compiled=False, state=None):
    """`optimizer_class` (the paper's settings, a cosine schedule) applied to fixed random gradients
    on fixed variables; step 2 has no gradient for the second variable. `state`: `optimizer_state`
    arrays to load before the steps. Returns (optimizer, variables, traced ops of a step or None)."""
    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(shape).astype("float32") for shape in OPTIMIZER_SHAPES]
    gradients = [[rng.standard_normal(shape).astype("float32") * 5 for shape in OPTIMIZER_SHAPES]
                 for _ in range(steps)]
    variables = [keras.Variable(value) for value in initial]
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 10)
    optimizer = optimizer_class(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0,
                                use_ema=ema_decay > 0, ema_momentum=ema_decay or 0.99)
    optimizer.build(variables)
    if state is not None:
        assert load_optimizer_state(optimizer, state)

    def apply(grads, without_second):
        optimizer.apply(grads, [v for i, v in enumerate(variables) if not (without_second and i == 1)])

    ops_in_step = None
    if compiled and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        apply = tf.function(apply)
        ops_in_step = len(apply.get_concrete_function([tf.constant(g) for g in gradients[0]], False)
                          .graph.get_operations())
    for step, step_gradients in enumerate(gradients):
        without_second = step == 2
        apply([ops.convert_to_tensor(g) for i, g in enumerate(step_gradients) if not (without_second and i == 1)],
              without_second)
    return optimizer, variables, ops_in_step


def _trained(optimizer, variables, ema_decay):
    averages = [numpy(a) for a in optimizer.moving_averages(variables)] if ema_decay else []
    return [numpy(v) for v in variables] + averages


@pytest.mark.parametrize("ema_decay", [0.0, 0.999])
def test_paper_adam_is_keras_adam_bit_for_bit_with_a_smaller_step(ema_decay):
    """The step's scalars computed once and the state in flat vectors give Keras' Adam (weight decay,
    clipping, cosine schedule, the average, a variable without a gradient) to the last bit, compiled
    and eager, with far fewer ops in the compiled step; the per-variable state too."""
    ours_class = AdamWithEMA if ema_decay else PaperAdam
    for compiled in (False, True):
        ours, variables, our_ops = _optimizer_run(ours_class, ema_decay, compiled=compiled)
        assert ours.keeps_flat_state
        keras_own, keras_variables, keras_ops = _optimizer_run(KerasOwnStep, ema_decay, compiled=compiled)
        assert not keras_own.keeps_flat_state
        per_variable, per_variable_variables, _ = _optimizer_run(PerVariableState, ema_decay, compiled=compiled)
        expected = _trained(keras_own, keras_variables, ema_decay)
        for got in (_trained(ours, variables, ema_decay), _trained(per_variable, per_variable_variables, ema_decay)):
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)
        if our_ops is not None:
            # Keras' schedule, bias corrections, clipping, decay and update, once per variable: ~35 ops each.
            assert keras_ops - our_ops > 20 * len(OPTIMIZER_SHAPES), (our_ops, keras_ops)
    assert isinstance(make_optimizer(1e-3, 10), PaperAdam) and ema_optimizer(make_optimizer(1e-3, 10)) is None
    # The flat state for short runs, the per-variable one for training runs, as asked where asked.
    assert make_optimizer(1e-3, FLAT_STATE_MAX_STEPS).flat_state
    assert not make_optimizer(1e-3, FLAT_STATE_MAX_STEPS + 1, ema_decay=0.9).flat_state
    assert make_optimizer(1e-3, 10_000, flat_state=True).flat_state and not make_optimizer(1e-3, 1, flat_state=False).flat_state
    assert not AdamWithEMA.from_config(make_optimizer(1e-3, 10_000, ema_decay=0.9).get_config()).flat_state


@pytest.mark.parametrize("ema_decay", [0.0, 0.999])
def test_the_flat_state_is_saved_in_keras_per_variable_layout_and_loads_from_it(ema_decay):
    """Checkpoints hold Keras' per-variable layout whatever the state: the flat state's arrays are
    the per-variable optimizer's, bit for bit, and either loads the other's and trains on the same."""
    flat_class = AdamWithEMA if ema_decay else PaperAdam
    flat, _, _ = _optimizer_run(flat_class, ema_decay, steps=3)
    per_variable, _, _ = _optimizer_run(PerVariableState, ema_decay, steps=3)
    flat_state, per_variable_state = list(optimizer_state(flat)), list(optimizer_state(per_variable))
    # The same kinds of state in the same order (the names hold each run's own variable names).
    kinds = [[re.split("[/_]", name)[-1] for name, _ in state] for state in (flat_state, per_variable_state)]
    assert kinds[0] == kinds[1] and kinds[0][:3] == ["iteration", "average" if ema_decay else "momentum",
                                                      "average" if ema_decay else "velocity"]
    for (_, a), (_, b) in zip(flat_state, per_variable_state, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each loads the other's state (the weights are the same fixed ones) and ends where the other would.
    arrays = {"flat": [a for _, a in flat_state], "per_variable": [a for _, a in per_variable_state]}
    from_per_variable = _optimizer_run(flat_class, ema_decay, steps=1, state=arrays["per_variable"])
    from_flat = _optimizer_run(PerVariableState, ema_decay, steps=1, state=arrays["flat"])
    for a, b in zip(_trained(*from_per_variable[:2], ema_decay), _trained(*from_flat[:2], ema_decay), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(numpy(from_per_variable[0].iterations)) == 4
    # A state of another shape is refused, nothing assigned.
    assert not load_optimizer_state(flat, arrays["flat"][:-1])
    np.testing.assert_array_equal(list(optimizer_state(flat))[-1][1], flat_state[-1][1])


def test_the_per_variable_state_where_the_flat_one_does_not_apply():
    """Under a distribution strategy (several GPUs), with per-variable clipping and above its size
    limit the optimizer keeps Keras' slots; a loss-scale wrapper's state is its own variables, then
    the inner optimizer's."""
    variable = keras.Variable(np.ones(3, np.float32))
    clipped = PaperAdam(learning_rate=0.1, clipnorm=1.0)
    clipped.build([variable])
    assert not clipped.keeps_flat_state

    class AtMostTwoWeights(PaperAdam):
        flat_state_max_size = 2

    too_large = AtMostTwoWeights(learning_rate=0.1)
    too_large.build([variable])
    assert not too_large.keeps_flat_state
    too_large.apply([ops.ones(3)], [variable])  # Keras' per-variable step
    assert len(list(optimizer_state(too_large))) == 4  # the step counter, the learning rate, the two moments
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
            mirrored_variable = keras.Variable(np.ones(3, np.float32))
            mirrored = make_optimizer(0.1, 10, ema_decay=0.9)
            mirrored.build([mirrored_variable])
        assert not mirrored.keeps_flat_state
    wrapped = keras.optimizers.LossScaleOptimizer(make_optimizer(0.1, 10, ema_decay=0.9))
    wrapped.build([variable])
    assert wrapped.inner_optimizer.keeps_flat_state
    wrapped.apply([ops.ones(3)], [variable])
    names = [name for name, _ in optimizer_state(wrapped)]
    # The wrapper's own variables (its step counter and scale among them), the inner step counter, then
    # the average and the two moments of the one variable.
    own = [v.path for v in wrapped._variables]
    assert names[:len(own)] == own and len(names) == len(own) + 4
    assert [name.rsplit("_", 1)[1] for name in names[-3:]] == ["average", "momentum", "velocity"]
    other = keras.optimizers.LossScaleOptimizer(make_optimizer(0.1, 10, ema_decay=0.9))
    other.build([keras.Variable(np.ones(3, np.float32))])
    assert load_optimizer_state(other, [a for _, a in optimizer_state(wrapped)])
    for (_, a), (_, b) in zip(optimizer_state(other), optimizer_state(wrapped), strict=True):
        np.testing.assert_array_equal(a, b)


# ----- label dropout: it is what trains the unconditional branch --------------------------------
def _denoising_losses(model, images, labels):
    """The UNet's loss on a fixed noisy draw (t in the noisier half), given the labels and given the
    all-zero (unconditional) label."""
    from Models.diffusion.unet import timestep_embedding

    x0 = model.encode_images(images)
    noise = ops.convert_to_tensor(np.random.default_rng(1).standard_normal(tuple(x0.shape)).astype("float32"))
    t = ops.convert_to_tensor(np.random.default_rng(2).integers(500, 1000, len(labels)).astype("int32"))
    x_t = model.schedule.add_noise(x0, noise, t)
    t_emb = timestep_embedding(t, model.preset.timestep_embedding_dim)
    target = model.schedule.training_target(x0, noise, t)
    losses = {}
    for name, one_hot in (("label", ops.one_hot(labels, model.num_classes)),
                          ("zero", ops.zeros((len(labels), model.num_classes)))):
        output = model.unet([x_t, t_emb, model.class_encoder(one_hot)])
        losses[name] = float(ops.mean((output - target) ** 2))
    return losses


def test_learning_rate_warmup_rises_linearly_from_zero_then_decays_as_a_cosine():
    from Models.diffusion.optimizer import learning_rate_schedule

    peak, total, warmup = 2e-3, 100, 20
    steps = np.arange(total + 1)
    rates = np.array([float(learning_rate_schedule(peak, total, warmup)(step)) for step in steps])
    np.testing.assert_allclose(rates[:warmup + 1], peak * steps[:warmup + 1] / warmup, rtol=1e-6, atol=1e-12)
    decayed = steps[warmup:] - warmup
    np.testing.assert_allclose(rates[warmup:], peak * 0.5 * (1 + np.cos(np.pi * decayed / (total - warmup))),
                               rtol=1e-5, atol=1e-10)
    # Without warmup: the paper's schedule, Keras' cosine decay from the first step, value for value.
    plain = keras.optimizers.schedules.CosineDecay(peak, total)
    assert ([float(learning_rate_schedule(peak, total)(step)) for step in steps]
            == [float(plain(step)) for step in steps])
    for bad in (-1, total, total + 1):
        with pytest.raises(ValueError, match="warmup steps"):
            learning_rate_schedule(peak, total, bad)
    # The optimiser steps with it: no update at all at step 0, where the rate is 0.
    optimizer = make_optimizer(peak, total, warmup_steps=warmup)
    weight = keras.Variable(np.ones(3, "float32"))
    optimizer.apply_gradients([(ops.ones(3), weight)])
    np.testing.assert_array_equal(numpy(weight), np.ones(3))
    assert float(optimizer.learning_rate) == pytest.approx(peak / warmup)
    optimizer.apply_gradients([(ops.ones(3), weight)])
    assert np.all(numpy(weight) < 1)


@pytest.mark.slow
def test_label_dropout_trains_the_unconditional_branch():
    # Two classes that only the label tells apart at high noise (black and white squares): a
    # UNet that has learnt the unconditional branch predicts their mean for the zero label;
    # one that never saw the zero label treats it as some class (measured: its loss rises
    # 1.50 -> 2.6 while the dropout-trained one falls 1.50 -> 0.3).
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.trainer import TrainBatches
    from Data.registry import get_spec
    from Models.diffusion.presets import get_preset

    labels = np.arange(256) % 2
    images = np.repeat(np.where(labels == 1, 255, 0).astype("uint8"), 8 * 8 * 3).reshape(256, 8, 8, 3)
    results = {}
    for dropout in (0.5, 0.0):
        keras.utils.set_random_seed(0)
        recipe = {**get_preset("small").recipe(), "cond_dropout": dropout, "ema_decay": 0.0}
        model = ck.build_model("tiny", get_spec("digits"), random_init=True, init_seed=0, seed=0, recipe=recipe)
        batches = TrainBatches(images, labels, 32, model.image_size)
        model.compile(optimizer=make_optimizer(2e-3, 16 * len(batches)))
        model.optimizer.build(model.trainable_variables)
        before = _denoising_losses(model, images, labels)
        model.fit(batches, epochs=16, verbose=0)
        results[dropout] = before, _denoising_losses(model, images, labels)
    for dropout, (before, after) in results.items():
        assert after["label"] < 0.2 * before["label"], (dropout, before, after)  # both learnt the classes
    (before, with_dropout), (_, without) = results[0.5], results[0.0]
    assert with_dropout["zero"] < 0.5 * before["zero"], results
    assert without["zero"] > 0.9 * before["zero"], results
    assert without["zero"] > 3 * with_dropout["zero"], results


# ----- EMA through SD_adapting.py: what checkpoints hold, and an exact resume ------------------
RESUME_ARGV = ["--dataset", "digits", "--preset", "tiny", "--train_model", "enc", "--epochs", "2",
               "--batch_size", "256", "--grid_per_class", "0", "--verbose", "0", "--ema_decay", "0.9"]


def _h5_arrays(path, group=None):
    import h5py

    with h5py.File(path, "r") as f:
        node = f[group] if group else f
        out = {}
        node.visititems(lambda name, item: out.__setitem__(name, item[()])
                        if isinstance(item, h5py.Dataset) else None)
        return out


def run_uninterrupted_and_killed(root):
    """SD_adapting.py's tiny enc run twice under `root`: once through, once killed right after its
    epoch-1 checkpoint and run again. Returns {"uninterrupted": folder, "killed": folder}."""
    import SD_adapting
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.callbacks import Checkpointer

    folders = {}
    for run in ("uninterrupted", "killed"):
        os.environ["SDDG_OUTPUT_ROOT"] = str(Path(root) / run)
        folders[run] = ck.diffusion_checkpoint_dir(0, "digits", "enc")
        if run == "uninterrupted":
            assert SD_adapting.main(RESUME_ARGV) == 0
            continue
        save_checkpoint = Checkpointer.on_epoch_end

        def killed_after_first_checkpoint(self, epoch, logs=None):
            save_checkpoint(self, epoch, logs)
            raise KeyboardInterrupt

        Checkpointer.on_epoch_end = killed_after_first_checkpoint
        try:
            SD_adapting.main(RESUME_ARGV)
            raise AssertionError("the run was not killed")
        except KeyboardInterrupt:
            pass
        finally:
            Checkpointer.on_epoch_end = save_checkpoint
        assert ck.resumable_epoch(folders[run]) == 1
        assert SD_adapting.main(RESUME_ARGV) == 0
    return folders


def largest_resume_differences(folders):
    """{file: largest |uninterrupted - resumed|} over the epoch-2 weights (the moving average) and the
    whole epoch-2 training state (trained weights, Adam's moments, the average, the step counter)."""
    out = {}
    for name in ("epoch_002.weights.h5", "epoch_002.optimizer.h5"):
        a, b = _h5_arrays(folders["uninterrupted"] / name), _h5_arrays(folders["killed"] / name)
        assert a.keys() == b.keys(), name
        out[name] = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]), initial=0.0)) for k in a)
    return out


@pytest.mark.slow
def test_ema_checkpoints_hold_the_average_and_a_killed_run_resumes_both(tmp_path, monkeypatch):
    from Models.diffusion import checkpoints as ck

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    folders = run_uninterrupted_and_killed(tmp_path)

    # The resumed run ends exactly where the uninterrupted one does: weights, their moving average,
    # Adam's moments and the step counter, on TensorFlow as under JAX (tests/test_recipe_jax.py). The
    # three models of this test are built in one process (Utils.runtime.fresh_layer_names).
    assert largest_resume_differences(folders) == {"epoch_002.weights.h5": 0.0, "epoch_002.optimizer.h5": 0.0}
    for name in ("epoch_002.weights.h5", "epoch_002.optimizer.h5"):
        trained_a = _h5_arrays(folders["uninterrupted"] / name, ck.TRAINED_GROUP if "optimizer" in name else None)
        trained_b = _h5_arrays(folders["killed"] / name, ck.TRAINED_GROUP if "optimizer" in name else None)
        assert trained_a.keys() == trained_b.keys() and trained_a, name
        for key in trained_a:
            np.testing.assert_array_equal(trained_a[key], trained_b[key], err_msg=f"{name}:{key}")

    # The weights file holds the moving average; the training state keeps the trained weights too.
    state = ck.optimizer_path(folders["uninterrupted"], 2)
    import h5py

    with h5py.File(state, "r") as f:
        averages = [f[k][()] for k in sorted(f) if isinstance(f[k], h5py.Dataset)
                    and "average" in f[k].attrs["path"]]
    weights = _h5_arrays(ck.weights_path(folders["uninterrupted"], 2))
    trained = _h5_arrays(state, ck.TRAINED_GROUP)
    assert averages and len(trained) == len(weights)
    stored = np.concatenate([v.ravel() for v in weights.values()])
    assert any(np.array_equal(a.ravel(), w.ravel()) for a in averages for w in weights.values() if a.size > 100)
    assert not np.array_equal(stored, np.concatenate([v.ravel() for v in trained.values()]))


def test_a_checkpoints_weights_file_holds_the_averages_without_swapping_them_in(tmp_path):
    import h5py

    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck

    model = ck.build_model("tiny", get_spec("digits"), seed=0)
    model.compile(optimizer=make_optimizer(1e-2, 10, ema_decay=0.999))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for _ in range(3):  # the weights and their averages drift apart
        model.optimizer.apply([rng.standard_normal(v.shape).astype("float32") for v in model.trainable_variables],
                              model.trainable_variables)
    weights = [numpy(v).copy() for v in model.trainable_variables]
    direct, swapped = tmp_path / "direct.weights.h5", tmp_path / "swapped.weights.h5"
    ck.save_parts(direct, model.trained_parts(), values=model.sampling_values)
    for variable, value in zip(model.trainable_variables, weights):  # nothing was swapped in
        np.testing.assert_array_equal(numpy(variable), value)
    with model.sampling_weights():
        ck.save_parts(swapped, model.trained_parts())

    def arrays(path):
        with h5py.File(path, "r") as f:
            out = {}
            f.visititems(lambda name, item: out.__setitem__(name, (item[()], item.attrs["path"]))
                         if isinstance(item, h5py.Dataset) else None)
            return out

    a, b = arrays(direct), arrays(swapped)
    assert a.keys() == b.keys() and len(a) == sum(len(layer.weights) for layer in model.trained_parts().values())
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=key)
        assert a[key][1] == b[key][1]
    stored = np.concatenate([a[key][0].ravel() for key in sorted(a)])
    assert not np.array_equal(stored, np.concatenate([w.ravel() for w in weights]))  # averages, not the weights


# ----- grey data -------------------------------------------------------------------------------
def test_grey_datasets_are_modelled_with_one_channel_and_generated_exactly_grey():
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck

    model = ck.build_model("small", get_spec("digits"), seed=0)
    assert model.unet.inputs[0].shape[-1] == 1 and model.unet.outputs[0].shape[-1] == 1
    images = model.generate([0, 5], num_steps=2, seed=0)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    rgb = ck.build_model("small", get_spec("retinamnist"), seed=0, with_autoencoder=False)
    assert rgb.unet.inputs[0].shape[-1] == 3


def test_tensorflow_compiles_with_xla_only_when_asked():
    from Utils.runtime import configure_runtime

    assert configure_runtime(xla=False) is False and configure_runtime(xla=True) is True
