"""Datasets latentkit generates itself (no files): `latentkit.data.shapes`."""

from __future__ import annotations

from latentkit.data import shapes

__all__ = ["shapes"]
