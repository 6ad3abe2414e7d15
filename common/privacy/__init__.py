"""Differential privacy at a site (Opacus DP-SGD, the budget ledger)."""
