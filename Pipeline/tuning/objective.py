"""The Optuna objective: generate a trial's images, train a ResNet20 on them, score on REAL validation data.

A trial picks an inference-step count, an unconditional guidance scale (UGS)
and a checkpoint epoch of the stage being tuned (the class encoder for
"enc", the fine-tuned UNet for "dif"), generates `num_imgs` images balanced
over the classes with that checkpoint (`Pipeline.tuning.images`), trains a
ResNet20 on them with the CAS protocol (`Models.classifier.train_classifier`)
and returns the best VALIDATION accuracy on the real validation split. The
real TEST accuracy of that classifier is stored as the trial's user
attributes "test_top1" / "test_top5", after the objective value is fixed, and
never optimised: the original optimised test accuracy, which leaks the test
set into model selection (PAPER.md, "Known defects").

Every epoch's validation accuracy goes to `trial.report`, and the Hyperband
pruner (as the paper configured it; min resource 1 epoch, max resource the
classifier epochs, reduction factor 3; `Pipeline.tuning.study.open_study`)
stops trials that fall behind.

All trials use the same generation seed and classifier seed, so two trials
differ only in their settings (common random numbers).

`objective="kid"` scores a trial by the kernel inception distance between its
images and the real training images instead (`Metrics.quality.kid_objective`;
minimised, no classifier per trial); its winner's CAS is measured afterwards
and recorded beside the accuracy-tuned one.

Example:
    >>> objective = GenerationObjective(source, space, load_dataset("digits"), num_imgs=500,
    ...                                 classifier_config=ClassifierConfig(epochs=5))
    >>> study.optimize(objective, n_trials=1)
    >>> objective.evaluate({"inf_steps": 50, "ugs": 7.5, "enc_epoch": 50})   # the no-opt row
"""

import time

import numpy as np
import optuna

from Pipeline.tuning.images import trial_labels
from Utils.cli import UserError

OBJECTIVES = ("cas", "kid")


class OptunaPruning:
    """A Keras callback: reports each epoch's validation accuracy to the trial; stops when pruned.

    Built lazily as a `keras.callbacks.Callback` subclass so this module imports without Keras.

    Example:
        >>> pruning = OptunaPruning.make(trial)
        >>> train_classifier(..., extra_callbacks=[pruning])
        >>> if pruning.pruned_at: raise optuna.TrialPruned()
    """

    @staticmethod
    def make(trial, monitor="val_accuracy"):
        import keras

        class _Pruning(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.pruned_at = None

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(monitor)
                if value is None:
                    return
                # step = epochs completed, the pruner's resource.
                trial.report(float(value), step=epoch + 1)
                if trial.should_prune():
                    self.pruned_at = epoch + 1
                    self.model.stop_training = True

        return _Pruning()


class GenerationObjective:
    """The Optuna objective: generate with the trial's settings, score on REAL validation data.

    Args:
        source: callable(settings, labels, seed) -> uint8 images (N, S, S, 3) at the
            dataset's size (`DiffusionImageSource`).
        space: the `SearchSpace`.
        splits: the real `Data.loaders.Splits` (train for KID, val for the objective,
            test only for the recorded test accuracy).
        num_imgs: generated images per trial, balanced over the classes.
        classifier_config: the ResNet20 protocol (`ClassifierConfig`).
        seed: generation and classifier seed, the same for every trial.
        objective: "cas" (validation accuracy, maximised) or "kid" (minimised).
        kid_objective: for "kid", callable(images, labels, real_images, real_labels, seed) -> float
            (default `Metrics.quality.kid_objective`).
        verbose: `model.fit` verbosity.

    Example:
        >>> objective = GenerationObjective(source, space, splits, 4000, ClassifierConfig())
        >>> study.optimize(objective, n_trials=1)
        >>> objective.evaluate({"inf_steps": 50, "ugs": 7.5, "enc_epoch": 50})   # no-opt row
    """

    def __init__(self, source, space, splits, num_imgs, classifier_config, seed=0, objective="cas",
                 kid_objective=None, verbose=0, classifier_pool=None):
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
        self.source, self.space, self.splits = source, space, splits
        self.spec = splits.spec
        self.labels = trial_labels(int(num_imgs), self.spec.num_classes)
        self.classifier_config = classifier_config
        self.seed = int(seed)
        self.objective = objective
        self.kid_objective = kid_objective
        self.verbose = verbose
        self.classifier_pool = classifier_pool

    @property
    def direction(self):
        return "minimize" if self.objective == "kid" else "maximize"

    def generate(self, settings):
        """The trial's images (uint8, dataset size) and labels."""
        images = np.asarray(self.source(settings, self.labels, self.seed))
        expected = (len(self.labels), self.spec.image_size, self.spec.image_size, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"the image source returned {images.dtype} {images.shape}, expected uint8 {expected}")
        return images, self.labels

    def validation_score(self, images, labels, callbacks=()):
        """Trains a ResNet20 on the images; returns (model, history, best validation accuracy).

        Reads the real validation split only.
        """
        from Models.classifier import train_classifier

        model, history = train_classifier(
            images, labels, self.splits.x_val, self.splits.y_val, self.spec.num_classes,
            config=self.classifier_config, seed=self.seed, extra_callbacks=list(callbacks),
            verbose=self.verbose, pool=self.classifier_pool)
        return model, history, float(max(history["val_accuracy"]))

    def test_accuracy(self, model):
        """Top-1 / top-5 on the real TEST split: recorded, never optimised."""
        from Models.classifier import evaluate_classifier

        result = evaluate_classifier(model, self.splits.x_test, self.splits.y_test, self.spec.label_names)
        return {"top1": result["top1"], "top5": result["top5"], "top_k": result["top_k"]}

    def kid(self, images, labels):
        kid_objective = self.kid_objective
        if kid_objective is None:
            from Metrics.quality import kid_objective
        return float(kid_objective(images, labels, self.splits.x_train, self.splits.y_train, seed=self.seed))

    def __call__(self, trial):
        settings = self.space.suggest(trial)
        started = time.perf_counter()
        images, labels = self.generate(settings)
        trial.set_user_attr("seconds_generate", round(time.perf_counter() - started, 2))
        if self.objective == "kid":
            value = self.kid(images, labels)
            trial.set_user_attr("kid", value)
            return value
        pruning = OptunaPruning.make(trial)
        started = time.perf_counter()
        model, history, value = self.validation_score(images, labels, callbacks=[pruning])
        trial.set_user_attr("seconds_train", round(time.perf_counter() - started, 2))
        trial.set_user_attr("epochs_run", history["epochs_run"])
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"validation accuracy {value:.4f} behind after epoch {pruning.pruned_at}")
        trial.set_user_attr("val_accuracy", value)
        # The objective value is fixed above; only now is the test split looked at.
        test = self.test_accuracy(model)
        trial.set_user_attr("test_top1", test["top1"])
        trial.set_user_attr("test_top5", test["top5"])
        return value

    def evaluate(self, settings):
        """Scores fixed settings (the no-opt row, a KID winner): validation and test accuracy."""
        images, labels = self.generate(settings)
        model, history, value = self.validation_score(images, labels)
        test = self.test_accuracy(model)
        return {"top1": test["top1"], "top5": test["top5"], "val_accuracy": value,
                "epochs_run": history["epochs_run"], "settings": dict(settings)}

