"""Metrics, LUNA16's FROC/CPM, the held-out test split."""
