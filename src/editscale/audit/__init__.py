"""Audit stage: provenance, hash chains and re-derivation of checkpoints from factors."""
