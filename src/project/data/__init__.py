"""Datasets: the registry of what each one is, and the LightningDataModule that serves it."""

from project.data.datamodule import ImageDataModule
from project.data.registry import DATASETS

__all__ = ["DATASETS", "ImageDataModule"]
