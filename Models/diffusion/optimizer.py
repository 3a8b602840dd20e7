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

import keras
from keras import ops


def make_optimizer(learning_rate, total_steps, ema_decay=0.0, ema_warmup=True):
    """The paper's optimiser for both stages, with an optional moving average of the weights.

    Adam(weight_decay 0.004, epsilon 1e-8, global_clipnorm 10) with the
    learning rate cosine-decayed to 0 over all `total_steps`. Keras' Adam with
    `weight_decay` decays the weights decoupled from the gradient (AdamW-style).
    `ema_decay` > 0 keeps an exponential moving average of the trained weights
    (`AdamWithEMA`); `ema_warmup` for weights that start random (see there).
    """
    schedule = keras.optimizers.schedules.CosineDecay(float(learning_rate), max(1, int(total_steps)))
    if ema_decay:
        return AdamWithEMA(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0,
                           use_ema=True, ema_momentum=float(ema_decay), ema_warmup=bool(ema_warmup))
    return PaperAdam(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0)


@keras.saving.register_keras_serializable(package="sddg")
class PaperAdam(keras.optimizers.Adam):
    """Keras' Adam with the scalars of a step computed once per step instead of once per variable.

    Keras evaluates the learning-rate schedule, Adam's bias corrections and the weight-decay
    learning rate again for every variable (`Adam.update_step`, `_apply_weight_decay`): with
    the cosine schedule some 25 graph ops per variable, for the ~300 variables of a
    from-scratch UNet, all of which TensorFlow traces and optimises before the first step.
    Here `_backend_apply_gradients` computes them once and the per-variable updates read
    them, with Keras' expressions in Keras' order: the optimizer's updates are Keras' to the
    last bit (tests/test_recipe.py). In a whole TensorFlow train step the graph optimiser
    (Grappler) rewrites the two graphs differently, so trained weights can differ from
    Keras' in the last bits (equal with Grappler off). The first `fit` of `tiny` takes ~1.5x
    less time (BENCHMARKS.md, `benchmarks/bench_first_step.py --vs_keras_step`).
    """

    _step_scalars = None  # learning_rate, alpha and Adam's constants while a step's updates are being built

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
            super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self._step_scalars = None

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

    def _update_model_variables_moving_average(self, trainable_variables):
        step = ops.cast(self.iterations, "float32")
        decay = ops.convert_to_tensor(float(self.ema_momentum), "float32")
        if self.ema_warmup:
            decay = ops.minimum(decay, (1.0 + step) / (10.0 + step))
        decay = decay * ops.cast(ops.not_equal(self.iterations, 0), "float32")  # step 0: the average = the weights
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
        """The average of each of `variables` (trained by this optimizer), in order."""
        return [self._model_variables_moving_average[self._get_variable_index(v)] for v in variables]

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
