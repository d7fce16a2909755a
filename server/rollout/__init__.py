"""Rollouts (docs/ROLLOUTS.md): traffic splits, sticky keys, shadow copies, automatic rollback."""
