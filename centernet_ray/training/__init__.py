"""Training without Ray: the engine (model, optimizer, AMP, the step and the epoch), the learning
rate schedules and the weight average. The Ray Train job over it is ``centernet_ray.ray_train``."""
