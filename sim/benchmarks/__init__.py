"""The sections of sim/bench.py, one module per concern (the script prints and saves them)."""
