"""Model editing: SparseSGDM, exact diagonal Fisher sensitivity, multi-round mask calibration."""

from masking.sparse_sgdm import SparseSGDM

__all__ = ["SparseSGDM"]
