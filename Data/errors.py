"""Errors of the data package: the user's data, data folders or data settings are wrong.

Example:
    >>> from Data.loaders import load_dataset
    >>> try:
    ...     splits = load_dataset("breastmnist", data_dir="/offline/cache")
    ... except DatasetNotFoundError as e:   # not there and not downloadable
    ...     print(e)
"""

from Utils.errors import InputError


class DataError(InputError):
    """A data set, data folder or data setting is wrong (unknown name, unreadable file, bad shard...)."""


class DatasetNotFoundError(DataError):
    """A data file or folder is missing and cannot be downloaded or created (offline, wrong MD5...)."""
