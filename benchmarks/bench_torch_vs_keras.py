"""Keras (TensorFlow or JAX backend) against diffusers/PyTorch: the same UNet, the same weights, one run.

For each preset the Keras UNet is built with random (seeded) weights and converted to a
diffusers `UNet2DConditionModel` with `Models/diffusion/diffusers_convert.py` (the
PyTorch tensors share the NumPy export's memory: two copies of the weights in all).
Then, alternating Keras and PyTorch in every round so that load on the machine hits
both alike:

  sampling  one classifier-free-guided DDIM step of B images: ours is the project's
            `DDIMSampler` step (one compiled call: UNet on 2B + update; XLA optional),
            diffusers' is its UNet on 2B under inference_mode + `DDIMScheduler.step`,
            both with the preset's noise schedule and prediction type;
  training  one step of the preset's regression loss (noise or v target): forward,
            backward and a plain SGD update (no optimizer state: full sd1 would need
            4 more copies with Adam), a compiled tf.function (--keras_backend jax: one
            jax.jit over `stateless_call`, the gradient and SGD's `stateless_apply`)
            against eager PyTorch; reported as seconds per step and images per second;
  fit       (--only fit) what a user's training gets: `DiffusionTrainer.fit` over
            --fit_steps batches of a `TrainBatches`, compiled as Pipeline/adapt.py does
            (Adam, weight decay, clipping, cosine decay, EMA; jax.jit on JAX), against
            the same UNet and class encoder in PyTorch with AdamW, clipping and an EMA;
            reported per batch. In one process the two `fit`s disturb each other:
            alternating, PyTorch's fit step took about twice its standalone time; with
            --fit_torch_first (all PyTorch rounds first) Keras' did (BENCHMARKS.md).
            --fit_processes N times each side in N fresh processes of its own instead
            (alternating which side starts), the figure to quote. --mixed_precision
            bfloat16 times both sides in mixed precision: Keras' mixed_bfloat16 policy
            (the product's --mixed_precision bfloat16) against torch.autocast on the CPU;
  profile   (--profile) the forward time per block type (ResBlocks, transformers, ...)
            and micro-benchmarks of the ops inside the slowest, to say why.

Usage (the figures in BENCHMARKS.md):
    nice -n 10 .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets tiny sd1 --profile --xla tiny
    # the from-scratch preset's training throughput, digits-like (8 px grey, the default for
    # small) and RetinaMNIST-like; 2 threads in each framework
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --only training --threads 2
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --only training --threads 2 \
        --image_size 28 --channels 3
    # the same under JAX (the backend is read before keras is imported), with the product's
    # fit step (Adam + EMA) as well; run the TensorFlow line with `--only training fit` to compare
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --only training fit --threads 2 \
        --keras_backend jax
    # the product's fit step against PyTorch's, each framework alone in its process (3 processes each)
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --only fit --threads 2 --fit_processes 3
    # the same in mixed precision (bfloat16 compute, float32 weights) on both sides
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --only fit --threads 2 --fit_processes 3 \
        --mixed_precision bfloat16
    # correctness: the losses of 5 SGD steps from NumPy-drawn weights, equal on every backend
    .venv/bin/python benchmarks/bench_torch_vs_keras.py --presets small --loss_check --keras_backend jax

Pixel presets model the dataset's channels: `--channels 1` (grey) or 3 (RGB); latent
presets always have 4.

Prints Markdown tables and one JSON line; --json writes the raw figures.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _flag_from_argv(argv, flag):
    """A flag's value before argparse runs: Keras reads KERAS_BACKEND and XLA reads XLA_FLAGS once, at import."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


if _flag_from_argv(sys.argv[1:], "--keras_backend"):
    os.environ["KERAS_BACKEND"] = _flag_from_argv(sys.argv[1:], "--keras_backend")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if _flag_from_argv(sys.argv[1:], "--threads") == "1":
    # --threads limits TensorFlow's and PyTorch's pools; XLA's CPU pool (the JAX side) only this way.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
from keras import ops  # noqa: E402

from Models.diffusion import diffusers_convert as dc  # noqa: E402
from Models.diffusion.generator import schedule_for  # noqa: E402
from Models.diffusion.presets import get_preset  # noqa: E402
from Models.diffusion.sampler import DDIMSampler  # noqa: E402
from Models.diffusion.unet import build_unet, timestep_embedding  # noqa: E402

# Per preset: image size, image channels (pixel presets; latent ones have 4), images per
# sampling step (2x UNet evaluations), training batch. small: digits (8 px, grey) at its
# enc-stage batch; --image_size / --channels override.
CASES = {
    "tiny": dict(image_size=32, channels=3, sample_batch=16, train_batch=32),
    "small": dict(image_size=8, channels=1, sample_batch=16, train_batch=32),
    "sd1": dict(image_size=128, channels=3, sample_batch=1, train_batch=2),
}
MEASURES = ("sampling", "training")
# Not in the default: the product's own train step (DiffusionTrainer.fit, Adam + EMA).
EXTRA_MEASURES = ("fit",)
BACKEND = keras.backend.backend()


def build_pair(preset, image_size, channels, seed=0, numpy_weights=False, unet=None):
    """Our UNet (random, seeded) and the diffusers UNet holding the same weights.

    numpy_weights: every weight drawn by NumPy (fan-in scaled), so that the weights, unlike
    Keras' seeded initialisers, are the same on every Keras backend (the loss check).
    unet: an already built UNet to convert (the trainer's).
    """
    keras.utils.set_random_seed(seed)
    if unet is None:
        unet = build_unet(preset, image_size, preset.context_length, image_channels=channels)
    rng = np.random.default_rng(seed)
    for variable in unet.weights:  # norms and biases too: no constant tensors
        if numpy_weights and len(variable.shape) > 1:
            scale = 1.0 / np.sqrt(np.prod(variable.shape[:-1]))
            variable.assign((scale * rng.standard_normal(variable.shape)).astype("float32"))
        elif numpy_weights:
            variable.assign((0.05 * rng.standard_normal(variable.shape)).astype("float32"))
        elif len(variable.shape) == 1:
            variable.assign(variable.numpy() + 0.05 * rng.standard_normal(variable.shape).astype("float32"))
    config = dc.diffusers_unet_config(preset, sample_size=image_size // preset.downsample, image_channels=channels)
    tensors = dc.unet_tensors(unet, preset)
    with torch.device("meta"):  # no third copy: the parameters become views of `tensors`
        model = diffusers.UNet2DConditionModel.from_config(config)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in tensors.items()}, assign=True)
    return unet, model.eval(), tensors


def inputs(preset, case, batch, seed=0):
    size = case["image_size"] // preset.downsample
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, preset.unet_channels(case["channels"]))).astype("float32")
    context = rng.standard_normal((batch, preset.context_length, preset.context_dim)).astype("float32")
    timesteps = rng.integers(0, 1000, batch)
    return x, context, timesteps


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def training_batch(preset, case):
    """(x_t, timesteps, context, target) of one training step under the preset's schedule."""
    schedule = schedule_for(preset)
    x0, context, timesteps = inputs(preset, case, case["train_batch"], seed=1)
    noise = np.random.default_rng(2).standard_normal(x0.shape).astype("float32")
    alpha = schedule.alphas_cumprod[timesteps].astype("float32").reshape(-1, 1, 1, 1)
    x_t = np.sqrt(alpha) * x0 + np.sqrt(1 - alpha) * noise
    target = noise if schedule.prediction_type == "epsilon" else np.sqrt(alpha) * noise - np.sqrt(1 - alpha) * x0
    return x_t.astype("float32"), timesteps, context, target.astype("float32")


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def set_exact_gelu(unet, exact):
    """Switches every GEGLU of `unet` between the exact and the tanh GELU (read at call time, eager)."""
    for layer in unet.layers:
        if hasattr(layer, "transformer_block"):
            layer.transformer_block.geglu.approximate = not exact


def parity(unet, model, preset, case):
    """Max abs difference of one noise prediction (same inputs): the weights are the same."""
    x, context, timesteps = inputs(preset, case, 1)
    ours = np.asarray(unet([ops.convert_to_tensor(x),
                            timestep_embedding(ops.convert_to_tensor(timesteps), preset.timestep_embedding_dim),
                            ops.convert_to_tensor(context)]))
    with torch.inference_mode():
        theirs = model(nchw(x), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    return float(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max())


class KerasSampling:
    """One guided DDIM step of the project's sampler (steps of a 50-step schedule)."""

    def __init__(self, unet, preset, case, jit_compile=False):
        self.sampler = DDIMSampler(unet, schedule_for(preset), preset.timestep_embedding_dim, jit_compile=jit_compile)
        batch = case["sample_batch"]
        self.x, context, _ = inputs(preset, case, batch)
        self.context, self.uncond = context, context[:1] * 0.5

    def __call__(self):
        self.sampler.sample(self.x, self.context, self.uncond, num_steps=1, guidance_scale=7.5)


class TorchSampling:
    """diffusers' equivalent: UNet on [uncond; cond] + DDIMScheduler.step (SD's config, the preset's schedule)."""

    def __init__(self, model, preset, case):
        self.model = model
        self.scheduler = diffusers.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            **schedule_for(preset).config())
        self.scheduler.set_timesteps(1)
        x, context, _ = inputs(preset, case, case["sample_batch"])
        self.x = nchw(x)
        self.context = torch.from_numpy(np.concatenate([np.repeat(context[:1] * 0.5, len(x), 0), context]))

    def __call__(self):
        t = self.scheduler.timesteps[0]
        with torch.inference_mode():
            eps = self.model(torch.cat([self.x, self.x]), t, self.context).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + 7.5 * (eps_cond - eps_uncond)
            self.scheduler.step(eps, t, self.x).prev_sample


class KerasTraining:
    """Forward + backward + SGD update of the regression MSE, as one tf.function."""

    def __init__(self, unet, preset, case, jit_compile=False):
        self.unet, self.preset = unet, preset
        self.optimizer = keras.optimizers.SGD(1e-4)
        self.optimizer.build(unet.trainable_variables)
        self.batch = [tf.constant(value) for value in training_batch(preset, case)]
        self.step = tf.function(self._step, jit_compile=jit_compile)

    def _step(self, x_t, timesteps, context, noise):
        with tf.GradientTape() as tape:
            t_emb = timestep_embedding(timesteps, self.preset.timestep_embedding_dim)
            loss = ops.mean(ops.square(self.unet([x_t, t_emb, context], training=True) - noise))
        grads = tape.gradient(loss, self.unet.trainable_variables)
        self.optimizer.apply(grads, self.unet.trainable_variables)
        return loss

    def __call__(self):
        return float(self.step(*self.batch))


class JaxTraining:
    """The same step under the JAX backend: one jax.jit over `stateless_call`, gradient and the
    Keras SGD's `stateless_apply`, the variables' buffers donated (updated in place)."""

    def __init__(self, unet, preset, case):
        import jax

        self.unet, self.preset = unet, preset
        self.optimizer = keras.optimizers.SGD(1e-4)
        self.optimizer.build(unet.trainable_variables)
        self.batch = [jax.numpy.asarray(value) for value in training_batch(preset, case)]
        self.state = ([v.value for v in unet.trainable_variables], [v.value for v in unet.non_trainable_variables],
                      [v.value for v in self.optimizer.variables])
        self.step = jax.jit(self._step, donate_argnums=(0,))

    def _loss(self, trainable, non_trainable, x_t, timesteps, context, noise):
        import jax.numpy as jnp

        t_emb = timestep_embedding(timesteps, self.preset.timestep_embedding_dim)
        output, non_trainable = self.unet.stateless_call(trainable, non_trainable, [x_t, t_emb, context],
                                                         training=True)
        return jnp.mean(jnp.square(output - noise)), non_trainable

    def _step(self, state, x_t, timesteps, context, noise):
        import jax

        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = jax.value_and_grad(self._loss, has_aux=True)(
            trainable, non_trainable, x_t, timesteps, context, noise)
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    def __call__(self):
        loss, self.state = self.step(self.state, *self.batch)
        return float(loss)


class TorchTraining:
    def __init__(self, model, preset, case):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        x_t, timesteps, context, target = training_batch(preset, case)
        self.batch = (nchw(x_t), torch.from_numpy(timesteps), torch.from_numpy(context), nchw(target))

    def __call__(self):
        x_t, timesteps, context, noise = self.batch
        self.model.train()
        loss = ((self.model(x_t, timesteps, context).sample - noise) ** 2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients before the Keras turn
        self.model.eval()
        return float(loss.detach())


# ----- fit: the product's train step -------------------------------------------------------------
def fit_data(preset, case, steps, seed=0):
    """Digits-like uint8 images (steps batches of the training batch) and labels of 10 classes."""
    rng = np.random.default_rng(seed)
    count = steps * case["train_batch"]
    images = rng.integers(0, 256, (count, case["image_size"], case["image_size"], case["channels"]), dtype=np.uint8)
    return images, rng.integers(0, 10, count)


class KerasFit:
    """`DiffusionTrainer.fit` over `steps` batches (one epoch of a `TrainBatches`), compiled as
    Pipeline/adapt.py does (`make_optimizer`: Adam, weight decay, clipping, cosine decay, EMA).

    jit_compile: compile's; "auto" is jax.jit on JAX and a plain tf.function on TensorFlow.
    """

    def __init__(self, preset, case, steps, jit_compile="auto", optimizer_state="per_variable"):
        from Models.diffusion.optimizer import make_optimizer
        from Models.diffusion.trainer import DiffusionTrainer, TrainBatches

        keras.utils.set_random_seed(0)
        self.trainer = DiffusionTrainer.from_preset(preset.name, num_classes=10, image_size=case["image_size"],
                                                    stage="enc", image_channels=case["channels"])
        optimizer = make_optimizer(preset.enc_lr, 100 * steps, preset.ema_decay,
                                   flat_state=optimizer_state == "flat")
        self.trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
        self.batches = TrainBatches(*fit_data(preset, case, steps), case["train_batch"], case["image_size"])

    def __call__(self):
        history = self.trainer.fit(self.batches, epochs=1, verbose=0)
        return history.history["loss"][-1]


class TorchFit:
    """The same in PyTorch: diffusers' UNet (the trainer's weights) + a class encoder of the same
    shape, AdamW (weight decay 0.004, eps 1e-8), norm clipping at 10, the cosine schedule, an EMA
    of the trained weights (foreach lerp, decay warmed up as `AdamWithEMA`), label dropout and
    the preset's noise schedule and target, drawn per step."""

    def __init__(self, model, trainer, preset, case, steps, autocast=False):
        schedule = schedule_for(preset)
        self.autocast = autocast  # the forward pass in bfloat16 (the loss in float32): PyTorch's mixed precision
        encoder = trainer.class_encoder
        self.encoder = torch.nn.Sequential(torch.nn.Linear(10, encoder.hidden),
                                           torch.nn.Linear(encoder.hidden, encoder.context_length * encoder.context_dim,
                                                           bias=False))
        self.context_shape = (encoder.context_length, encoder.context_dim)
        self.model, self.preset, self.steps = model, preset, steps
        self.params = [*model.parameters(), *self.encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=preset.enc_lr, weight_decay=0.004, eps=1e-8)
        self.lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, 100 * steps)
        self.averages = [p.detach().clone() for p in self.params]
        self.updates = 0
        self.alphas = torch.from_numpy(schedule.alphas_cumprod.astype("float32"))
        self.v_target = schedule.prediction_type != "epsilon"
        images, labels = fit_data(preset, case, steps)
        self.images, self.labels = nchw(images.astype("float32") / 127.5 - 1), torch.from_numpy(labels)
        self.batch, self.cond_dropout = case["train_batch"], preset.cond_dropout

    def step(self, x0, labels):
        batch = len(x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(self.alphas), (batch,))
        alpha = self.alphas[t].reshape(-1, 1, 1, 1)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0 if self.v_target else noise
        one_hot = torch.nn.functional.one_hot(labels, 10).float()
        one_hot = one_hot * (torch.rand(batch, 1) >= self.cond_dropout).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            context = self.encoder(one_hot).reshape(batch, *self.context_shape)
            prediction = self.model(x_t, t, context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        decay = min(self.preset.ema_decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], 1 - decay)
        return loss

    def __call__(self):
        self.model.train()
        order = torch.randperm(len(self.labels))
        for i in range(self.steps):
            chosen = order[i * self.batch:(i + 1) * self.batch]
            loss = self.step(self.images[chosen], self.labels[chosen])
        self.model.eval()
        return float(loss.detach())


def loss_check(preset, case, steps=5):
    """Losses of `steps` SGD steps from the same (NumPy-drawn) weights, Keras and PyTorch: the
    first is at the starting weights, so it must agree across frameworks and Keras backends."""
    unet, model, tensors = build_pair(preset, case["image_size"], case["channels"], numpy_weights=True)
    runner = (JaxTraining if BACKEND == "jax" else KerasTraining)(unet, preset, case)
    keras_losses = [runner() for _ in range(steps)]
    torch_runner = TorchTraining(model, preset, case)
    torch_losses = [torch_runner() for _ in range(steps)]
    return {"keras": keras_losses, "torch": torch_losses}


def side_by_side(runners, rounds):
    """{name: [seconds per round]}; one warm-up call each (compilation), then alternating rounds."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(timed(run))
            gc.collect()
    return times


# ----- profile: where the time goes ------------------------------------------------------
def block_profile(unet, model, preset, case, rounds):
    """Forward seconds per block type, ours against diffusers', at the sampling batch (2B)."""
    batch = 2 * case["sample_batch"]
    prefixes = dc._unet_block_prefixes(preset)
    by_type = {}
    for layer in unet.layers:
        if layer.weights:
            by_type.setdefault(type(layer).__name__, []).append(layer)
    x, context, timesteps = inputs(preset, case, batch)
    with torch.inference_mode():  # the projected timestep embedding every ResBlock takes
        temb_torch = model.time_embedding(model.time_proj(torch.from_numpy(timesteps)))
    temb_keras = tf.constant(temb_torch.numpy())
    context_keras = tf.constant(context)
    context_torch = torch.from_numpy(context)
    totals = {}
    for kind in ("UNetResBlock", "SpatialTransformer", "PaddedConv2D", "Upsample"):
        keras_total = torch_total = 0.0
        for layer, prefix in zip(by_type.get(kind, []), prefixes[kind]):
            shape = layer.input[0].shape if kind in ("UNetResBlock", "SpatialTransformer") else layer.input.shape
            hidden = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype("float32")
            module = model.get_submodule(prefix)
            h_keras, h_torch = tf.constant(hidden), nchw(hidden)
            if kind == "UNetResBlock":
                k, t = _compare(layer, ([h_keras, temb_keras],), module, (h_torch, temb_torch), rounds)
            elif kind == "SpatialTransformer":
                k, t = _compare(layer, ([h_keras, context_keras],), module, (h_torch, context_torch), rounds)
            else:
                k, t = _compare(layer, (h_keras,), module, (h_torch,), rounds)
            keras_total, torch_total = keras_total + k, torch_total + t
        totals[kind] = (keras_total, torch_total)
    return totals


def _compare(keras_layer, keras_args, torch_module, torch_args, rounds):
    """Median seconds of one call: the Keras layer in a tf.function, the torch module in inference mode."""

    @tf.function
    def keras_call():
        return keras_layer(*keras_args)

    def torch_call():
        return torch_module(*torch_args)

    keras_call()
    with torch.inference_mode():
        torch_call()
        k = statistics.median(timed(keras_call) for _ in range(rounds))
        t = statistics.median(timed(torch_call) for _ in range(rounds))
    return k, t


def _compare_backward(keras_layer, keras_input, torch_module, torch_input, rounds):
    """Median seconds of forward + gradient w.r.t. the input and the weights (what training pays)."""

    @tf.function
    def keras_call():
        with tf.GradientTape() as tape:
            tape.watch(keras_input)
            loss = tf.reduce_sum(keras_layer(keras_input))
        return tape.gradient(loss, [keras_input, *keras_layer.trainable_variables])

    def torch_call():
        x = torch_input.detach().requires_grad_()
        torch_module(x).sum().backward()
        torch_module.zero_grad(set_to_none=True)

    keras_call()
    torch_call()
    k = statistics.median(timed(keras_call) for _ in range(rounds))
    t = statistics.median(timed(torch_call) for _ in range(rounds))
    return k, t


def op_profile(preset, case, rounds):
    """Micro-benchmarks of the ops inside the UNet blocks, at the first level's shapes (2B images)."""
    from diffusers.models.activations import GEGLU as TorchGEGLU
    from diffusers.models.attention_processor import Attention

    from Models.diffusion.layers import GEGLU, CrossAttention, PaddedConv2D

    batch = 2 * case["sample_batch"]
    size = case["image_size"] // preset.downsample
    channels, heads = preset.level_channels[0], preset.level_heads[0]
    tokens = size * size
    rng = np.random.default_rng(0)
    image = rng.standard_normal((batch, size, size, channels)).astype("float32")
    sequence = rng.standard_normal((batch, tokens, channels)).astype("float32")
    image_keras, image_torch = tf.constant(image), nchw(image)
    sequence_keras, sequence_torch = tf.constant(sequence), torch.from_numpy(sequence)
    pairs = {
        "GroupNorm": (keras.layers.GroupNormalization(groups=preset.norm_groups, epsilon=1e-5), image_keras,
                      torch.nn.GroupNorm(preset.norm_groups, channels, eps=1e-5), image_torch),
        "conv 3x3, ZeroPadding2D + Conv2D (ours)": (PaddedConv2D(channels, 3, padding=1), image_keras,
                                                    torch.nn.Conv2d(channels, channels, 3, padding=1), image_torch),
        "conv 3x3, Conv2D(padding='same')": (keras.layers.Conv2D(channels, 3, padding="same"), image_keras,
                                             torch.nn.Conv2d(channels, channels, 3, padding=1), image_torch),
        f"self-attention, {tokens} tokens (matmul+softmax vs SDPA)": (
            CrossAttention(heads, channels // heads), sequence_keras,
            Attention(channels, heads=heads, dim_head=channels // heads), sequence_torch),
        "GEGLU": (GEGLU(channels * 4, approximate=False), sequence_keras,
                  TorchGEGLU(channels, channels * 4), sequence_torch),
    }
    results = {name: _compare(layer, (x_keras,), module, (x_torch,), rounds)
               for name, (layer, x_keras, module, x_torch) in pairs.items()}
    layer, x_keras, module, x_torch = pairs["GroupNorm"]
    results["GroupNorm, forward + backward"] = _compare_backward(layer, x_keras, module, x_torch, rounds)
    return results


# ----- report -------------------------------------------------------------------------------
def run_preset(name, rounds, profile, xla, overrides=None, measures=MEASURES, fit_steps=10, fit_torch_first=False,
               fit_side=None, mixed_precision="float32", optimizer_state="per_variable"):
    """fit_side: time only this side's fit ("keras" with its XLA variant, or "torch"), for --fit_processes.
    mixed_precision: the fit's precision on both sides (the other measures are float32)."""
    preset = get_preset(name)
    case = {**CASES[name], **{key: value for key, value in (overrides or {}).items() if value is not None}}
    case["channels"] = preset.unet_channels(case["channels"])
    if case["image_size"] % preset.min_image_size:
        raise SystemExit(f"error: {name} needs an image size that is a multiple of {preset.min_image_size}")
    if "loss_check" in measures:
        return {"preset": name, **case, "loss_check": loss_check(preset, case)}
    unet, model, tensors = build_pair(preset, case["image_size"], case["channels"])
    params = sum(int(np.prod(v.shape)) for v in unet.weights)
    result = {"preset": name, **case, "params": params, "max_abs_diff": parity(unet, model, preset, case)}
    if preset.gelu_approximate:  # keras-cv's tanh GELU (the sd presets): the exact one, as diffusers
        set_exact_gelu(unet, True)
        result["max_abs_diff_exact_gelu"] = parity(unet, model, preset, case)
        set_exact_gelu(unet, False)

    if "sampling" in measures:
        sampling = {"keras": KerasSampling(unet, preset, case), "torch": TorchSampling(model, preset, case)}
        if xla:
            sampling["keras_xla"] = KerasSampling(unet, preset, case, jit_compile=True)
        result["sampling_s"] = side_by_side(sampling, rounds)
        del sampling
        gc.collect()
    if profile:
        result["blocks_s"] = block_profile(unet, model, preset, case, rounds)
        result["ops_s"] = op_profile(preset, case, rounds)
    if "training" in measures:
        keras_training = JaxTraining if BACKEND == "jax" else KerasTraining
        training = {"keras": keras_training(unet, preset, case), "torch": TorchTraining(model, preset, case)}
        result["training_s"] = side_by_side(training, rounds)
        del training
    if "fit" in measures:
        # A "torch" side still builds the Keras trainer: its weights are the ones PyTorch's UNet gets.
        keras.mixed_precision.set_dtype_policy("float32" if mixed_precision == "float32" else f"mixed_{mixed_precision}")
        keras_fit = KerasFit(preset, case, fit_steps, optimizer_state=optimizer_state)
        fitting = {} if fit_side == "torch" else {"keras": keras_fit}
        if fit_side != "keras":
            _, fit_model, _ = build_pair(preset, case["image_size"], case["channels"], unet=keras_fit.trainer.unet)
            fitting["torch"] = TorchFit(fit_model, keras_fit.trainer, preset, case, fit_steps,
                                        autocast=mixed_precision == "bfloat16")
            del fit_model
        if xla and BACKEND == "tensorflow" and fit_side != "torch":  # under JAX the step is XLA-compiled already
            fitting["keras_xla"] = KerasFit(preset, case, fit_steps, jit_compile=True, optimizer_state=optimizer_state)
        keras.mixed_precision.set_dtype_policy("float32")
        result["mixed_precision"] = mixed_precision
        if fit_torch_first:
            # All PyTorch rounds before any Keras `fit` (see the module docstring's caveat).
            seconds = side_by_side({"torch": fitting.pop("torch")}, rounds)
            seconds.update(side_by_side(fitting, rounds))
        else:
            seconds = side_by_side(fitting, rounds)
        result["fit_steps"] = fit_steps
        result["fit_s"] = {side: [value / fit_steps for value in values] for side, values in seconds.items()}
        del fitting, keras_fit
    del unet, model, tensors
    keras.backend.clear_session()
    gc.collect()
    return result


def _without(argv, flag):
    """argv less `flag` and its values (either spelling; no value of this script starts with "--")."""
    kept, skipping = [], False
    for arg in argv:
        if arg == flag:
            skipping = True
        elif skipping and not arg.startswith("--"):
            continue
        else:
            skipping = False
            if not arg.startswith(flag + "="):
                kept.append(arg)
    return kept


def fit_in_processes(name, args, argv):
    """The fit measurement with each framework alone in its process: args.fit_processes fresh processes
    per side, alternating which side starts; each process compiles (one warm-up epoch) and then times
    args.rounds epochs. Per-batch seconds of all processes are pooled (median over processes x rounds)."""
    child_argv = _without(_without(_without(argv, "--fit_processes"), "--presets"), "--preset")
    result, sides = None, ("keras", "torch")
    seconds = {}
    for index in range(args.fit_processes):
        for side in (sides if index % 2 == 0 else sides[::-1]):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "fit.json"
                command = [sys.executable, str(Path(__file__).resolve()), *child_argv, "--presets", name,
                           "--fit_side", side, "--json", str(out)]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                child = json.loads(out.read_text())["results"][0]
            for each_side, values in child["fit_s"].items():
                seconds.setdefault(each_side, []).extend(values)
            print(f"{name}: {side} process {index + 1}/{args.fit_processes}: "
                  + ", ".join(f"{s} {statistics.median(v):.4f} s/batch" for s, v in child["fit_s"].items()),
                  file=sys.stderr, flush=True)
            result = result or {key: value for key, value in child.items() if key != "fit_s"}
    result["fit_s"] = seconds
    result["fit_processes"] = args.fit_processes
    return result


def markdown(results):
    name = {"tensorflow": "TF", "jax": "JAX"}.get(BACKEND, BACKEND)
    lines = [f"| preset | what | Keras/{name} s | PyTorch s | Keras img/s | PyTorch img/s | Keras / PyTorch (time) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "loss_check" in r:
            for side, losses in r["loss_check"].items():
                lines.append(f"\n{r['preset']}: loss check, {side}: " + " ".join(f"{v:.8f}" for v in losses))
            continue
        for what, key, images in (("guided DDIM step", "sampling_s", r["sample_batch"]),
                                  ("training step (SGD)", "training_s", r["train_batch"]),
                                  ("fit step (Adam + EMA, per batch)" + (
                                      ", each framework in its own processes" if r.get("fit_processes") else "") + (
                                      f", mixed {r['mixed_precision']}" if r.get("mixed_precision", "float32") != "float32"
                                      else ""),
                                   "fit_s", r["train_batch"])):
            if key not in r:
                continue
            unit = f"{images} img" if key == "sampling_s" else f"batch {images}"
            keras_s, torch_s = (statistics.median(r[key][side]) for side in ("keras", "torch"))
            lines.append(f"| {r['preset']} ({r['image_size']} px x {r['channels']}, {r['params'] / 1e6:.2f}M) | "
                         f"{what}, {unit} | {keras_s:.4f} | {torch_s:.4f} | {images / keras_s:.0f} | "
                         f"{images / torch_s:.0f} | {keras_s / torch_s:.2f} |")
            if "keras_xla" in r[key]:
                xla_s = statistics.median(r[key]["keras_xla"])
                lines.append(f"| | {what}, XLA | {xla_s:.4f} | {torch_s:.4f} | {images / xla_s:.0f} | "
                             f"{images / torch_s:.0f} | {xla_s / torch_s:.2f} |")
    for r in results:
        if "loss_check" in r:
            continue
        lines.append(f"\n{r['preset']}: same weights, one noise prediction: max abs difference "
                     f"{r['max_abs_diff']:.2e}" + (f" (tanh GELU of the preset; {r['max_abs_diff_exact_gelu']:.2e} "
                                                   "with the exact GELU)" if "max_abs_diff_exact_gelu" in r else ""))
        if "blocks_s" in r:
            lines += ["", f"{r['preset']}: forward seconds by block type (batch {2 * r['sample_batch']})", "",
                      "| block | Keras/TF s | PyTorch s | Keras / PyTorch |", "| --- | --- | --- | --- |"]
            for kind, (k, t) in r["blocks_s"].items():
                lines.append(f"| {kind} | {k:.4f} | {t:.4f} | {k / t:.2f} |")
            lines += ["", f"{r['preset']}: ops at the first level's shapes", "",
                      "| op | Keras/TF s | PyTorch s | Keras / PyTorch |", "| --- | --- | --- | --- |"]
            for op, (k, t) in r["ops_s"].items():
                lines.append(f"| {op} | {k:.5f} | {t:.5f} | {k / t:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", "--preset", nargs="+", default=["tiny", "sd1"], choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (median)")
    parser.add_argument("--profile", action="store_true", help="per block type and per op timings")
    parser.add_argument("--xla", nargs="*", default=[], choices=sorted(CASES), metavar="PRESET",
                        help="also time the Keras sampler with XLA for these presets (compiling sd1 takes minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads per op in both frameworks (default: every core). On a shared CPU "
                             "use 1: PyTorch's worker threads spin-wait and slow down many times over")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    parser.add_argument("--only", nargs="+", default=list(MEASURES), choices=MEASURES + EXTRA_MEASURES,
                        help="what to time (default: sampling and training); fit: DiffusionTrainer.fit "
                             "(Adam + EMA) against AdamW in PyTorch")
    parser.add_argument("--keras_backend", choices=("tensorflow", "jax"), default=BACKEND,
                        help="Keras backend (read before keras is imported; default $KERAS_BACKEND or "
                             "tensorflow). jax: the training step is one jax.jit")
    parser.add_argument("--fit_steps", type=int, default=10, help="batches per timed fit epoch")
    parser.add_argument("--optimizer_state", choices=("flat", "per_variable"), default="per_variable",
                        help="the Keras fit's optimizer state: one slot per variable (default: what a training run "
                             "uses) or flat vectors (short runs; Models/diffusion/optimizer.py)")
    parser.add_argument("--fit_torch_first", action="store_true",
                        help="fit: all PyTorch rounds before the Keras ones instead of alternating")
    parser.add_argument("--fit_processes", type=int, default=0, metavar="N",
                        help="fit: time each side in N fresh processes of its own (alternating which side "
                             "starts), --rounds rounds each, so that neither framework's threads disturb the other")
    parser.add_argument("--fit_side", choices=("keras", "torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mixed_precision", choices=("float32", "bfloat16"), default="float32",
                        help="fit: train both sides in this precision (Keras' mixed_bfloat16 policy, the product's "
                             "--mixed_precision bfloat16, against torch.autocast on the CPU; weights stay float32)")
    parser.add_argument("--loss_check", action="store_true",
                        help="only print the losses of 5 training steps from NumPy-drawn weights "
                             "(equal across Keras backends and PyTorch)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="image size in pixels for every preset (default: the preset's case, small: 8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="image channels of pixel presets: 1 grey, 3 RGB (default: the case's, small: 1)")
    parser.add_argument("--train_batch", type=int, default=None, help="training batch (default: the case's)")
    parser.add_argument("--sample_batch", type=int, default=None, help="images per DDIM step (default: the case's)")
    args = parser.parse_args(argv)
    if args.keras_backend != BACKEND:
        raise SystemExit(f"error: keras is already imported with the {BACKEND} backend")
    measures = ["loss_check"] if args.loss_check else args.only
    overrides = {"image_size": args.image_size, "channels": args.channels,
                 "train_batch": args.train_batch, "sample_batch": args.sample_batch}
    torch.set_num_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.fit_processes < 0 or args.rounds < 1:
        raise SystemExit("error: --fit_processes must be 0 or more and --rounds at least 1")
    if args.mixed_precision != "float32" and (args.loss_check or args.only != ["fit"]):
        raise SystemExit("error: --mixed_precision applies to the fit alone: use it with --only fit")
    if args.fit_processes and args.only != ["fit"]:
        raise SystemExit("error: --fit_processes times the fit alone: use it with --only fit")
    if args.fit_processes:
        results = [fit_in_processes(name, args, argv if argv is not None else sys.argv[1:])
                   for name in args.presets]
    else:
        results = [run_preset(name, args.rounds, args.profile, name in args.xla, overrides, measures, args.fit_steps,
                              args.fit_torch_first, args.fit_side, args.mixed_precision, args.optimizer_state)
                   for name in args.presets]
    env = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "machine": platform.processor(),
           "tensorflow": tf.__version__, "keras": keras.__version__, "keras_backend": BACKEND, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads(),
           "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
           "load_average": os.getloadavg(), "command": " ".join(sys.argv)}
    if not args.fit_side:  # a --fit_processes child times one side: its parent prints the table
        print(markdown(results))
    print(json.dumps({"env": env, "results": results}))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
