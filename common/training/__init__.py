"""The model factory, the one training engine, weights on the wire."""
