"""The Ray Train job: driver (``job``), per-worker glue over ``centernet_ray.engine`` (``loop``), schedules, MLflow."""
