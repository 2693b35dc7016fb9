"""Hydra configuration groups for medfed (composed by `federation.config`)."""
