"""Ray Tune sweeps over training runs: search spaces, the trial function, resumable ASHA, the
sweep's MLflow parent run and its report."""
