"""What a hospital never runs: plots, the comparison report, CAMs, the privacy audit."""
