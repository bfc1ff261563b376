"""Adapters: map a model family or a checkpoint onto a Spec."""

from .infer import InferredSpec, infer_spec

__all__ = ["InferredSpec", "infer_spec"]
