"""What the training job checks before its ingest, so that a mistake answers in seconds instead of
after the data work or never: the workers and the preprocessing fit the Ray (resources, node pools),
and ``model.pretrained`` names weights that fit the backbone. ``build_trainer`` runs them, and a
sweep before its own ingest (for each value its trials may take)."""

from __future__ import annotations

from ray.train import ScalingConfig

from centernet_ray import ray_runtime, storage
from centernet_ray.config import Config
from centernet_ray.model import build_trunk
from centernet_ray.model.pretrained import check_weights_name
from centernet_ray.ray_data.pipeline import preprocessing_min_cpus


def scaling_config(config: Config) -> ScalingConfig:
    """The training run's workers: ``train.num_workers``, each on a GPU or a CPU (``train.use_gpu``)."""
    return ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
                         label_selector=config.cluster.train_selector())


def check_workers_fit(config: Config, trial_driver_cpus: float = 0.0) -> None:
    """What the run needs of Ray at once, refused where the Ray this command started lacks it, before
    the ingest (Ray Train would retry the workers' start for ever, Ray Data keep its tasks pending):
    the workers (one GPU each with ``train.use_gpu``, else one CPU), the preprocessing stage's least
    CPUs, ``trial_driver_cpus`` (a Tune trial's driver) and the node pools' labels."""
    train = config.train
    need = dict(scaling_config(config).total_resources)
    need["CPU"] = need.get("CPU", 0.0) + preprocessing_min_cpus(config.data) + trial_driver_cpus
    workers = (f"{ray_runtime.counted(train.num_workers, 'training worker')} (train.num_workers={train.num_workers}, "
               f"train.use_gpu={str(train.use_gpu).lower()})")
    who = (f"{workers}, the preprocessing and the trial's driver" if trial_driver_cpus
           else f"{workers} and the preprocessing")
    ray_runtime.check_resources(need, who, _asks_for_less)
    ray_runtime.check_node_labels(config.cluster.train_selector(), "the training workers")
    ray_runtime.check_node_labels(config.cluster.data_selector(), "the data stages")


def _asks_for_less(resource: str, has: float) -> str:
    if resource != "GPU":
        return ("lower train.num_workers, or the preprocessing's CPUs (data.preprocess_num_cpus, "
                "data.preprocess_min_actors)")
    return "set train.use_gpu=false to train on the CPU" + (f", or train.num_workers={int(has)}" if has >= 1 else "")


def check_pretrained_file(config: Config) -> None:
    """``model.pretrained`` checked here, before the ingest, not by every worker after it: a weights
    name the backbone has none of is refused; a file is loaded into the model's trunk, so that
    weights that do not fit it (another architecture, a truncated copy) are refused. A file missing
    here is refused where the workers would miss it too (a URI, or a Ray this command started), and
    warned about on a cluster joined, whose GPU nodes may have it while this one does not."""
    if not config.model.pretrained:
        return
    if not storage.names_a_weights_file(config.model.pretrained):
        check_weights_name(config.model)
        return
    if storage.is_file(config.model.pretrained):
        build_trunk(config.model)  # a ResNet-18's weights are 45 MB, DLA-34's 63 MB: read in well under a second
        return
    ray_runtime.refuse_or_warn_missing(
        config.model.pretrained, f"model.pretrained: no weights file {config.model.pretrained} here (every training "
        "worker reads it at that path; model.pretrained=null trains the backbone from scratch)")
