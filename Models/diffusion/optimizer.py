"""The paper's optimiser (`PaperAdam`), and `AdamWithEMA`: the same with a moving average of the weights.

The average lives in the optimizer (its variables), so optimizer checkpoints carry it and a
resumed run continues it exactly; `DiffusionTrainer.sampling_weights` swaps it in for sampling
and saving.

Example:
    >>> trainer.compile(optimizer=make_optimizer(1e-3, total_steps=300, ema_decay=0.999))
    >>> trainer.fit(batches, epochs=10)
    >>> with ema_optimizer(trainer.optimizer).averaged_weights(trainer.trainable_variables):
    ...     images = trainer.generate(labels)
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops


# The flat state (`PaperAdam`) makes the first step's trace ~4-6 s cheaper and, in a process of its own,
# each later step dearer on this CPU: 5-15 % while TensorFlow's 128 KB mmap threshold made its whole-vector
# temporaries fresh pages every step, and still in the one run since that threshold is undone
# (BENCHMARKS.md, "The optimizer's state in flat vectors", "TensorFlow's mmap threshold"). Both give the same updates to the last bit,
# so `make_optimizer` picks by the run's length: flat for short runs (tests, smoke runs), per variable
# for training runs, where the steady step is what counts.
FLAT_STATE_MAX_STEPS = 300


def make_optimizer(learning_rate, total_steps, ema_decay=0.0, ema_warmup=True, flat_state=None, warmup_steps=0):
    """The paper's optimiser for both stages, with an optional moving average of the weights.

    Adam(weight_decay 0.004, epsilon 1e-8, global_clipnorm 10) with the
    learning rate cosine-decayed to 0 over all `total_steps`. Keras' Adam with
    `weight_decay` decays the weights decoupled from the gradient (AdamW-style).
    `warmup_steps` > 0 (diffusers' `--lr_warmup_steps`): the rate rises linearly from 0
    to `learning_rate` over those first steps, then decays over the rest.
    `ema_decay` > 0 keeps an exponential moving average of the trained weights
    (`AdamWithEMA`); `ema_warmup` for weights that start random (see there).
    `flat_state`: keep the state in flat vectors (`PaperAdam`); None: for runs of at
    most `FLAT_STATE_MAX_STEPS` steps. The trained weights are the same either way.
    """
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    if flat_state is None:
        flat_state = int(total_steps) <= FLAT_STATE_MAX_STEPS
    if ema_decay:
        return AdamWithEMA(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0,
                           use_ema=True, ema_momentum=float(ema_decay), ema_warmup=bool(ema_warmup),
                           flat_state=flat_state)
    return PaperAdam(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0,
                     flat_state=flat_state)


def learning_rate_schedule(learning_rate, total_steps, warmup_steps=0):
    """Cosine decay to 0 at `total_steps`, after a linear warmup from 0 over `warmup_steps`.

    Without warmup it is the paper's schedule, Keras' CosineDecay from the first step. A
    three-level UNet from scratch stays, at `small`'s peak rate, on the loss plateau every run
    here passes through in its first epochs; with a warmup it leaves it (BENCHMARKS.md, "The
    wider generator with a learning-rate warmup").
    """
    total_steps, warmup_steps = max(1, int(total_steps)), int(warmup_steps)
    if warmup_steps < 0 or warmup_steps >= total_steps:
        raise ValueError(f"{warmup_steps} warmup steps: expected 0 or more and fewer than the run's "
                         f"{total_steps} steps")
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(float(learning_rate), total_steps)
    return keras.optimizers.schedules.CosineDecay(0.0, total_steps - warmup_steps,
                                                  warmup_target=float(learning_rate), warmup_steps=warmup_steps)


@keras.saving.register_keras_serializable(package="sddg")
class PaperAdam(keras.optimizers.Adam):
    """Keras' Adam, its state in flat vectors and its step computed on them at once.

    Keras' Adam updates every variable on its own: the learning-rate schedule, the bias
    corrections, the weight decay, the clipping and Adam's moments again for each one, some 35
    graph ops per variable, for the ~300 variables of a from-scratch UNet, all of which
    TensorFlow traces and its graph optimiser rewrites before the first step. Here the step's
    scalars are computed once, and the moments (and `AdamWithEMA`'s average) are each one flat
    vector over all the trained variables: the step concatenates the gradients and the weights,
    updates the whole vectors with Keras' expressions in Keras' order, and writes each weight
    back: ~10 graph ops per variable. The updates are Keras' to the last bit (tests/test_recipe.py),
    and a TensorFlow train step's first `fit` takes much less time; its later steps, in a process of
    their own, take more (BENCHMARKS.md, "The optimizer's state in flat vectors"), so `make_optimizer`
    keeps it for short runs only (`flat_state`).

    The flat state is kept where it is exact and simple: float32 variables, global-norm or no
    clipping, no gradient accumulation, AMSGrad or excluded variables, no distribution (several
    GPUs: each replica's variables are updated by the strategy, variable by variable), and at most
    `flat_state_max_size` trained weights (a whole sd1 UNet trains with Keras' slots).
    Elsewhere the state is Keras' own, one slot per variable, with the scalars still once per
    step. Checkpoints hold Keras' per-variable layout either way (`state_items`), so a run
    resumes across the two, and files written before the flat state load unchanged.
    """

    flat_state = True  # False: Keras' per-variable slots (`make_optimizer` chooses; tests compare the two)
    # The flat step holds whole-vector temporaries (the gradients, the weights, the new moments) at once
    # where Keras' step holds one variable's: for a whole sd1 UNet (860 M weights, 3.4 GB per vector) some
    # 15 GB more accelerator memory at the step's peak (estimated, not measured). Above this many trained
    # weights the state stays per variable; the trace it saves matters for small models' short runs.
    flat_state_max_size = 1 << 26  # 67 M weights: 256 MB per float32 vector
    _step_scalars = None  # learning_rate, alpha and Adam's constants while a step's updates are being built
    _flat = None  # while flat: {"sizes", "shapes", "momentum", "velocity", "average"}

    def __init__(self, *args, flat_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        if flat_state is not None:  # else the class's
            self.flat_state = bool(flat_state)

    def get_config(self):
        return {**super().get_config(), "flat_state": self.flat_state}

    # ----- building the state ----------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        if not self._can_keep_flat_state(var_list):
            return super().build(var_list)
        use_ema = self.use_ema
        self.use_ema = False  # the base class would make one average per variable
        try:
            keras.optimizers.Optimizer.build(self, var_list)  # the step counter, the variable index
        finally:
            self.use_ema = use_ema
        total = sum(math.prod(v.shape) for v in var_list)
        self._flat = {"shapes": [tuple(v.shape) for v in var_list],
                      "sizes": [math.prod(v.shape) for v in var_list]}
        for name in ("momentum", "velocity") + (("average",) if use_ema else ()):
            self._flat[name] = self.add_variable((total,), initializer="zeros", name=f"flat_{name}")

    @property
    def keeps_flat_state(self):
        """Whether the built state is the flat one (else Keras' per-variable slots)."""
        return self._flat is not None

    def _can_keep_flat_state(self, var_list):
        return (self.flat_state and sum(math.prod(v.shape) for v in var_list) <= self.flat_state_max_size
                and not self.amsgrad and not self.gradient_accumulation_steps
                and not self.clipnorm and not self.clipvalue and self.ema_overwrite_frequency is None
                and not getattr(self, "_exclude_from_weight_decay", None)
                and not getattr(self, "_exclude_from_weight_decay_pattern", None)
                and all(v.dtype == "float32" and not self._overwrite_variable_with_gradient(v) for v in var_list)
                and not _distributed())

    # ----- the step ----------------------------------------------------------------------------
    def _backend_apply_gradients(self, grads, trainable_variables):
        learning_rate = super()._get_current_learning_rate()
        local_step = ops.cast(self.iterations + 1, "float32")
        beta_1_power = ops.power(ops.cast(self.beta_1, "float32"), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, "float32"), local_step)
        alpha = ops.cast(learning_rate, "float32") * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        # Keras' Python constants too, as tensors made once instead of a graph constant per variable.
        constants = {"1 - beta_1": 1 - self.beta_1, "1 - beta_2": 1 - self.beta_2, "epsilon": self.epsilon}
        self._step_scalars = {"learning_rate": learning_rate, "alpha": alpha,
                              **{name: ops.convert_to_tensor(value, "float32") for name, value in constants.items()}}
        try:
            if self._flat is None:
                super()._backend_apply_gradients(grads, trainable_variables)
            else:
                self._flat_step(grads, trainable_variables)
        finally:
            self._step_scalars = None

    def _flat_step(self, grads, trainable_variables):
        """Keras' clipping, weight decay, Adam update and moving average on the flat vectors."""
        scalars, flat = self._step_scalars, self._flat
        built = self._trainable_variables
        if self.global_clipnorm:
            # Keras' `clip_by_global_norm`: the squares summed per variable, then over the variables.
            norm = ops.sqrt(ops.sum(ops.stack([ops.sum(ops.square(g)) for g in grads])))
        given = {self._get_variable_index(v): g for g, v in zip(grads, trainable_variables)}
        # A variable without a gradient keeps its weight and moments, as in Keras (zeros here, masked below).
        grads = [given[i] if i in given else ops.zeros(flat["shapes"][i]) for i in range(len(built))]
        gradient = _concatenate(grads, flat["sizes"])
        if self.global_clipnorm:
            clip = self.global_clipnorm
            scale = clip * ops.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
            gradient = gradient * scale
        weights = _concatenate(built, flat["sizes"])
        learning_rate = scalars["learning_rate"]
        if self.weight_decay is not None:  # as in Keras: only None skips it
            weights = weights - weights * ops.cast(self.weight_decay, "float32") * learning_rate
        m, v = flat["momentum"], flat["velocity"]
        new_m = m + (gradient - m) * scalars["1 - beta_1"]
        new_v = v + (ops.square(gradient) - v) * scalars["1 - beta_2"]
        new_weights = weights - (new_m * scalars["alpha"]) / (ops.sqrt(new_v) + scalars["epsilon"])
        if len(given) < len(built):
            updated = np.concatenate([np.full(n, i in given) for i, n in enumerate(flat["sizes"])])
            new_m, new_v = ops.where(updated, new_m, m), ops.where(updated, new_v, v)
            new_weights = ops.where(updated, new_weights, _concatenate(built, flat["sizes"]))
        m.assign(new_m)
        v.assign(new_v)
        for variable, value in zip(built, _split(new_weights, flat["sizes"])):
            variable.assign(ops.reshape(value, variable.shape))
        if self.use_ema:
            average = flat["average"]
            decay, one_minus_decay = self._ema_decay()
            average.assign(decay * average + one_minus_decay * new_weights)

    def _get_current_learning_rate(self):
        # Read per variable by the weight decay (and by `update_step`'s caller) within a step.
        if self._step_scalars is not None:
            return self._step_scalars["learning_rate"]
        return super()._get_current_learning_rate()

    def update_step(self, gradient, variable, learning_rate):
        if self._step_scalars is None or self.amsgrad or variable.dtype != "float32":
            return super().update_step(gradient, variable, learning_rate)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        gradient = ops.cast(gradient, variable.dtype)
        # Keras' Adam.update_step, its expressions unchanged, the bias-corrected rate shared.
        scalars = self._step_scalars
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), scalars["1 - beta_1"]))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), scalars["1 - beta_2"]))
        self.assign_sub(variable, ops.divide(ops.multiply(m, scalars["alpha"]),
                                             ops.add(ops.sqrt(v), scalars["epsilon"])))

    # ----- the state in Keras' per-variable layout (checkpoints) ------------------------------
    def state_items(self):
        """(name, NumPy array) of this optimizer's state in the order and shapes of Keras' own Adam
        (its step counter, then one average per variable, then each variable's two moments),
        whether the state is flat or not; one piece at a time (sd1's state is ~10 GB)."""
        if self._flat is None:
            yield from ((v.path, ops.convert_to_numpy(v)) for v in self.variables)
            return
        flat = self._flat
        yield from ((v.path, ops.convert_to_numpy(v)) for v in self.variables if not _is_flat(v, flat))
        names = [f"{self.name}/{v.path.replace('/', '_')}" for v in self._trainable_variables]
        if "average" in flat:
            yield from zip([f"{n}_average" for n in names], self._flat_pieces("average"))
        for name, m, v in zip(names, self._flat_pieces("momentum"), self._flat_pieces("velocity")):
            yield f"{name}_momentum", m
            yield f"{name}_velocity", v

    def state_shapes(self):
        """The shapes of `state_items`' arrays, without reading any value."""
        if self._flat is None:
            return [tuple(v.shape) for v in self.variables]
        shapes = self._flat["shapes"]
        own = [tuple(v.shape) for v in self.variables if not _is_flat(v, self._flat)]
        return own + (shapes if "average" in self._flat else []) + [s for shape in shapes for s in (shape, shape)]

    def load_state_values(self, values):
        """Assigns the arrays of `state_items` (written with either state)."""
        if self._flat is None:
            for variable, value in zip(self.variables, values):
                variable.assign(value)
            return
        flat = self._flat
        own = [v for v in self.variables if not _is_flat(v, flat)]
        for variable, value in zip(own, values):
            variable.assign(value)
        n = len(flat["shapes"])
        rest = list(values[len(own):])
        if "average" in flat:
            flat["average"].assign(np.concatenate([np.ravel(a) for a in rest[:n]]))
            rest = rest[n:]
        flat["momentum"].assign(np.concatenate([np.ravel(a) for a in rest[0::2]]))
        flat["velocity"].assign(np.concatenate([np.ravel(a) for a in rest[1::2]]))

    def _flat_pieces(self, name):
        """One flat state vector as per-variable NumPy arrays: read whole when small, else piece by piece."""
        flat = self._flat
        offsets = np.cumsum([0] + flat["sizes"])
        vector = flat[name]
        if offsets[-1] <= 1 << 24:
            vector = ops.convert_to_numpy(vector)
        for i, shape in enumerate(flat["shapes"]):
            yield np.reshape(ops.convert_to_numpy(vector[offsets[i]:offsets[i + 1]]), shape)


@keras.saving.register_keras_serializable(package="sddg")
class AdamWithEMA(PaperAdam):
    """Adam with Keras' moving average of the weights, warmed up as diffusers' `EMAModel`.

    The average starts as the weights. With `ema_warmup` its decay at update t is
    min(ema_momentum, (1 + t) / (10 + t)): Keras' own uses ema_momentum from the first
    step, so after a short from-scratch run its average would still hold much of the
    random initialisation. Without (`ema_warmup=False`, for weights loaded from a
    checkpoint that already holds an average, as the fine-tuning stage's) the decay is
    ema_momentum throughout: a warm-up there would forget the good starting point within
    a few steps (digits, `small`'s one fine-tuning epoch: CAS x2 92.8 % with the warm-up,
    95.0 % without, x1 92.2 % both; BENCHMARKS.md). The averages are optimizer variables, so optimizer checkpoints carry them
    and a resumed run continues them exactly.

    Example:
        >>> optimizer = AdamWithEMA(learning_rate=1e-3, use_ema=True, ema_momentum=0.999)
        >>> with optimizer.averaged_weights(model.trainable_variables):
        ...     images = model.generate(labels)      # samples with the average
    """

    def __init__(self, *args, ema_warmup=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_warmup = bool(ema_warmup)

    def get_config(self):
        return {**super().get_config(), "ema_warmup": self.ema_warmup}

    def _ema_decay(self):
        """(d, 1 - d) of this step's update of the average (float32)."""
        step = ops.cast(self.iterations, "float32")
        decay = ops.convert_to_tensor(float(self.ema_momentum), "float32")
        if self.ema_warmup:
            decay = ops.minimum(decay, (1.0 + step) / (10.0 + step))
        decay = decay * ops.cast(ops.not_equal(self.iterations, 0), "float32")  # step 0: the average = the weights
        return decay, 1.0 - decay

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras' per-variable state (the flat one is updated in `_flat_step`).
        decay, _ = self._ema_decay()
        by_dtype = {}  # (d, 1 - d) once per dtype, not once per variable (fewer graph ops to trace)
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                if variable.dtype not in by_dtype:
                    d = ops.cast(decay, variable.dtype)
                    by_dtype[variable.dtype] = d, 1.0 - d
                d, one_minus_d = by_dtype[variable.dtype]
                average.assign(d * average + one_minus_d * variable)

    def finalize_variable_values(self, var_list):
        # Keras would copy the averages into the weights at the end of `fit`; here the weights
        # stay the trained ones (a later `fit` continues them) and the averages are used
        # explicitly, through `averaged_weights`.
        pass

    def moving_averages(self, variables):
        """The average of each of `variables` (trained by this optimizer), in order: variables, or
        with the flat state, tensors read from it."""
        indices = [self._get_variable_index(v) for v in variables]
        if self._flat is None:
            return [self._model_variables_moving_average[i] for i in indices]
        offsets = np.cumsum([0] + self._flat["sizes"])
        average = self._flat["average"]
        return [ops.reshape(average[offsets[i]:offsets[i + 1]], self._flat["shapes"][i]) for i in indices]

    @contextlib.contextmanager
    def averaged_weights(self, variables):
        """Within the block, `variables` hold their moving averages; afterwards their own values again."""
        variables = list(variables)
        saved = [keras.ops.convert_to_numpy(v) for v in variables]
        for variable, average in zip(variables, self.moving_averages(variables)):
            variable.assign(keras.ops.convert_to_numpy(average))  # a copy: JAX must not alias the two
        try:
            yield
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)


def ema_optimizer(optimizer):
    """The `AdamWithEMA` inside `optimizer` (mixed precision wraps it), or None without an average."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, AdamWithEMA) and inner.use_ema else None


def optimizer_state(optimizer):
    """(name, array) of an optimizer's state in Keras' per-variable layout, what checkpoints hold,
    one at a time (`PaperAdam.state_items`; a loss-scale wrapper's own variables first, as in its
    `variables`)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if isinstance(optimizer, PaperAdam):
        yield from optimizer.state_items()
    elif isinstance(inner, PaperAdam):
        # `LossScaleOptimizer.variables` is its own `_variables`, then the inner optimizer's.
        yield from ((v.path, ops.convert_to_numpy(v)) for v in optimizer._variables)
        yield from inner.state_items()
    else:
        yield from ((v.path, ops.convert_to_numpy(v)) for v in optimizer.variables)


def load_optimizer_state(optimizer, values):
    """Assigns `optimizer_state`'s arrays; False (nothing assigned) where their shapes do not fit."""
    inner = getattr(optimizer, "inner_optimizer", None)
    own, target = [], optimizer
    if isinstance(inner, PaperAdam) and not isinstance(optimizer, PaperAdam):
        own, target = list(optimizer._variables), inner
    if isinstance(target, PaperAdam):
        shapes = [tuple(v.shape) for v in own] + target.state_shapes()
    else:
        shapes = [tuple(v.shape) for v in optimizer.variables]
    if [tuple(np.shape(v)) for v in values] != shapes:
        return False
    for variable, value in zip(own, values):
        variable.assign(value)
    if isinstance(target, PaperAdam):
        target.load_state_values(values[len(own):])
    else:
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)
    return True


def _distributed():
    """Whether a distribution (several devices) is in effect for the variables built now."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.has_strategy()
    return keras.distribution.distribution() is not None


def _concatenate(tensors, sizes):
    """`tensors` as one 1-D vector (its length static: a densified sparse gradient's is not)."""
    return ops.concatenate([ops.reshape(t, (n,)) for t, n in zip(tensors, sizes)], axis=0)


def _split(flat, sizes):
    """`flat` cut into pieces of `sizes` (1-D each)."""
    if len(sizes) == 1:
        return [flat]
    return ops.split(flat, [int(i) for i in np.cumsum(sizes)[:-1]], axis=0)


def _is_flat(variable, flat):
    return any(variable is flat[name] for name in ("momentum", "velocity", "average") if name in flat)
