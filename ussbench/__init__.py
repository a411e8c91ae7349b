"""ussbench: benchmark clustering strategies for unsupervised semantic segmentation on frozen ViT features."""

from __future__ import annotations

__version__ = "0.1.0"

from .registry import available, get, register  # noqa: E402

__all__ = ["__version__", "available", "get", "register"]
