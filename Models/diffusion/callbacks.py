"""Keras callbacks of the diffusion training (Pipeline/adapt.py): seeds, log, TensorBoard, checkpoints.

Each is a plain `keras.callbacks.Callback` over the trainable model of
`Models/diffusion/trainer.py`:

    model.fit(batches, initial_epoch=start, epochs=epochs, shuffle=False, callbacks=[
        EpochSeeds(model, seed, batches), EpochLog(folder / "log.csv", keep_through=start),
        Checkpointer(model, folder, freq, epochs, spec, grid_per_class=4, seed=seed, start=start),
        TensorBoardScalars(folder / "logs")])
"""

import csv
import io
import time

import keras
import numpy as np

from Data.images import save_image_grid
from Models.diffusion import checkpoints as ck
from Models.diffusion.optimizer import ema_optimizer
from Utils.io import atomic_write_text

CSV_FIELDS = ("epoch", "loss", "learning_rate", "seconds")


class EpochSeeds(keras.callbacks.Callback):
    """Epoch e draws its training noise from (seed, e) and reads `batches` in their epoch-e order.

    So a run resumed at epoch e trains on what an uninterrupted one does. The order is set
    here rather than counted by the batches themselves: Keras reads one batch and ends a
    data epoch before training starts, which would shift a counter. Use with
    `fit(..., shuffle=False)`: Keras' own shuffle of the batch order draws from the
    process's global random state, which a resumed process does not share.
    """

    def __init__(self, model, seed, batches=None):
        super().__init__()
        self._diffusion = model
        self._seed = int(seed)
        self._batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        state = self._diffusion.seed_generator.state
        value = np.random.default_rng([self._seed, epoch]).integers(0, 2 ** 31 - 1)
        state.assign(np.array([value, 0], dtype=state.dtype))
        if self._batches is not None:
            self._batches.set_epoch(epoch)


class EpochLog(keras.callbacks.Callback):
    """log.csv: one row per finished epoch, rewritten atomically; rows past a resume point are dropped."""

    def __init__(self, path, keep_through):
        super().__init__()
        self.path = path
        self.rows = []
        if path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_through]
        self._started = None

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = float(optimizer.learning_rate) if optimizer is not None else float("nan")
        self.rows.append({"epoch": epoch + 1, "loss": f"{float(logs['loss']):.6f}",
                          "learning_rate": f"{lr:.6g}",
                          "seconds": f"{time.perf_counter() - self._started:.1f}"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())


class TensorBoardScalars(keras.callbacks.Callback):
    """TensorBoard event files with the loss and learning rate per epoch.

    Written with TensorFlow's core summary op, so the `tensorboard` package is
    only needed to look at them, not to write them (keras.callbacks.TensorBoard
    needs it installed). Skipped when TensorFlow is not installed.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        try:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2
        except ImportError:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        values = {"epoch_loss": float(logs["loss"]),
                  "epoch_learning_rate": float(self.model.optimizer.learning_rate)}
        with tf.device("/cpu:0"), self._writer.as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=epoch + 1, metadata=metadata)
        self._writer.flush()


class Checkpointer(keras.callbacks.Callback):
    """Every `freq` epochs and at the last: optimizer state, then weights (each atomic), then a sample grid."""

    def __init__(self, model, folder, freq, epochs, spec, grid_per_class, seed, start=0, jit_compile=False,
                 grid_freq=1):
        super().__init__()
        self._diffusion = model
        self.folder, self.freq, self.epochs, self.grid_freq = folder, freq, epochs, grid_freq
        self.spec, self.grid_per_class, self.seed, self.start = spec, grid_per_class, seed, start
        self.jit_compile = jit_compile

    def on_train_begin(self, logs=None):
        # A run killed between a checkpoint and its grid: draw the grid of the resumed checkpoint.
        if self.start and self.wants_grid(self.start) and not self.grid_path(self.start).exists():
            with self._diffusion.sampling_weights():
                self.save_grid(self.start)

    def wants_grid(self, done):
        return bool(self.grid_per_class) and (done % self.grid_freq == 0 or done == self.epochs)

    def grid_path(self, epoch):
        return self.folder / f"samples_epoch_{epoch:03d}.png"

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.freq and done != self.epochs:
            return
        model = self._diffusion
        ema = ema_optimizer(model.optimizer)
        ck.save_optimizer(ck.optimizer_path(self.folder, done), model.optimizer, done,
                          trained_parts=model.trained_parts() if ema else None)
        # With an EMA, the weights file and the grid get the average: what generation samples with.
        # The file is written from the averages themselves; only a grid swaps them into the model.
        ck.save_parts(ck.weights_path(self.folder, done), model.trained_parts(),
                      attrs={"epoch": done, "stage": model.stage, "preset": model.preset.name,
                             "dataset": self.spec.name},
                      values=model.sampling_values)
        if self.wants_grid(done):
            with model.sampling_weights():
                self.save_grid(done)
        ck.remove_old_optimizer_states(self.folder, done)

    def save_grid(self, done):
        model = self._diffusion
        labels = np.repeat(np.arange(self.spec.num_classes), self.grid_per_class)
        # One batch of exactly the grid's size: padding it to a round batch would cost samples no one sees.
        images = model.generate(labels, seed=self.seed, batch_size=min(64, len(labels)),
                                jit_compile=self.jit_compile)
        save_image_grid(images, labels, self.spec.label_names,
                        self.grid_path(done), per_class=self.grid_per_class,
                        title=f"{self.spec.name}, {model.preset.name}, {model.stage} epoch {done}: "
                              f"{model.preset.default_inference_steps} steps, "
                              f"guidance {model.preset.default_guidance_scale:g}")
