"""The Ray Train job: driver (``job``), per-worker loop (``loop``), evaluation, schedules, MLflow."""
