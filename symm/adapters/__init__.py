"""Adapters: map a model family or a checkpoint onto a Spec."""

from .hf import FAMILIES, is_hf_folder, load_hf, spec_from_hf
from .infer import InferredSpec, infer_spec

__all__ = ["FAMILIES", "InferredSpec", "infer_spec", "is_hf_folder", "load_hf", "spec_from_hf"]
