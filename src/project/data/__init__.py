"""Datasets: the sources images come from, the registry of the built-in ones, and the LightningDataModule that serves
any source."""

from project.data.datamodule import ImageData, ImageDataModule
from project.data.registry import DATASETS
from project.data.sources import AbsolutePath, Builtin, CSVLabels, ImageFolder, Images, MapDataset, Source

__all__ = [
    "DATASETS",
    "AbsolutePath",
    "Builtin",
    "CSVLabels",
    "ImageData",
    "ImageDataModule",
    "ImageFolder",
    "Images",
    "MapDataset",
    "Source",
]
