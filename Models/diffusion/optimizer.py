"""The paper's optimiser, and `AdamWithEMA`: Adam with a moving average of the trained weights.

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
    return keras.optimizers.Adam(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8,
                                 global_clipnorm=10.0)


@keras.saving.register_keras_serializable(package="sddg")
class AdamWithEMA(keras.optimizers.Adam):
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
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                d = ops.cast(decay, variable.dtype)
                average.assign(d * average + (1.0 - d) * variable)

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
