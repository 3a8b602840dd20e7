"""Datasets: the registry of real datasets, their loaders, and synthetic image folders."""
