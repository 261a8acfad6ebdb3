"""Byte-level language modelling: corpora and Transformer-XL style batching (vocabulary 256)."""
