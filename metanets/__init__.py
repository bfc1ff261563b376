"""Metanetworks (JAX/Flax) parameterised by the catalogue's Spec: the next issues build them here."""
