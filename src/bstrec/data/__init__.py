"""Data layer: canonical schema, loaders, synthetic generator, point-in-time samples."""

from bstrec.data.schema import DataFormatError, Dataset

__all__ = ["DataFormatError", "Dataset"]
