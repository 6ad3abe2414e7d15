"""A run on the coordinator's side: results folder, per-round tracker, centralized baseline."""
