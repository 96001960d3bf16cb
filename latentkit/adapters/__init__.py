"""Adapters on shared weights: LoRA (`latentkit.adapters.lora`) and textual-inversion
embeddings (`latentkit.adapters.textual_inversion`). Each returns new module trees that share
every unchanged parameter with the base networks, which are never modified."""

from latentkit.adapters.common import AdapterMismatchError, PartialAdapterWarning

__all__ = ["AdapterMismatchError", "PartialAdapterWarning"]
