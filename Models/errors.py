"""Errors of the model package: model settings, or weight and checkpoint files, that do not fit.

Example:
    >>> from Models.diffusion.presets import get_preset
    >>> try:
    ...     get_preset("sd3")
    ... except ModelSettingsError as e:
    ...     print(e)
    unknown diffusion preset 'sd3'; choose one of sd1, sd2, tiny, small
"""

from Utils.errors import InputError


class ModelError(InputError):
    """A model cannot be built, loaded or run as asked (base of the two below)."""


class ModelSettingsError(ModelError):
    """A model setting is wrong: unknown preset or classifier, an image size the network
    cannot take, sampler settings out of range, an architecture that cannot be converted."""


class CheckpointError(ModelError):
    """A weight or checkpoint file (or folder) is missing, unreadable, made with other settings,
    or does not fit the model; published weights that cannot be downloaded or fail their hash."""
