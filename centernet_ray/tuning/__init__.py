"""Ray Tune sweeps over training runs."""
