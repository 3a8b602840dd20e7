"""Errors of the metrics package: what to measure, or the files to measure, are wrong.

Example:
    >>> from Metrics.features import build_extractor
    >>> try:
    ...     build_extractor("vgg")
    ... except MetricsError as e:
    ...     print(e)     # unknown feature extractor 'vgg'; choose from: ...
"""

from Utils.errors import InputError


class MetricsError(InputError):
    """Unknown metric settings (reference split, feature extractor), missing results or
    feature-extractor weights, or a results file that is not one."""
