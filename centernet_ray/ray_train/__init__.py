"""The Ray Train job: the driver (``job``: data, TorchTrainer, resume, summary) and the per-worker
loop over ``centernet_ray.training.engine`` (``loop``: shards in, reports and checkpoints out)."""
