"""The configuration schema: one dataclass per section, with defaults, ranges and choices.

Fields carry their valid range in ``metadata`` and ``Literal`` annotations list the allowed
choices, so the one validator in ``config/loading.py`` produces uniform messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from centernet_ray.errors import UserInputError


class ConfigError(UserInputError):
    """A config file or override is invalid; the message says what to type instead."""


def _ranged(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


@dataclass
class ModelConfig:
    # The official model zoo's three families: ResNet + up-convolution neck ("resdcnN" = "resnetN"
    # with deformable=true), DLA-34 + DLA-Up/IDA-Up neck, and the two-stack Hourglass-104.
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resdcn18", "resdcn34", "resdcn50",
                      "resdcn101", "dla34", "hourglass104"] = "resnet18"
    width: float = _ranged(1.0, gt=0.0, le=4.0)  # ResNet channel multiplier (0.5 = half width)
    # modulated deformable 3x3 convs in the neck (ResNet: before each deconv; DLA-34: IDA-Up's nodes)
    deformable: bool = False
    lateral: bool = False  # ResNet neck adds 1x1 projections of the stride 16/8/4 stages (not official)
    neck_channels: tuple[int, int, int] = (256, 128, 64)  # ResNet neck
    head_conv: int = _ranged(64, ge=1)  # official: 64 for ResNet, 256 for DLA-34 and Hourglass
    # ResNet: a torchvision weights name ("DEFAULT", "IMAGENET1K_V1") or a local .pth; DLA-34: a local
    # copy of the DLA authors' ImageNet weights (dla34-ba72cf86.pth); None = random init
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if any(channels < 1 for channels in self.neck_channels):  # was a RuntimeError in every worker
            raise ConfigError(f"model.neck_channels must be >= 1 each; got {list(self.neck_channels)}")
        if self.backbone.startswith("resdcn"):
            self.deformable = True
        resnet = self.backbone.startswith(("resnet", "resdcn"))
        if not resnet and (self.width != 1.0 or self.lateral):
            raise ConfigError(f"model.width and model.lateral apply to ResNet backbones only; {self.backbone} "
                              f"has a fixed architecture (got width={self.width}, lateral={self.lateral})")
        if resnet and self.pretrained and self.width != 1.0:
            raise ConfigError(f"model.pretrained: ImageNet weights fit the standard width only (model.width=1.0); "
                              f"got width={self.width}: set model.pretrained=null to train a narrower ResNet "
                              "from scratch")
        if self.backbone == "hourglass104" and self.pretrained:
            raise ConfigError("model.pretrained: there are no ImageNet weights for hourglass104 (the official "
                              "recipe trains it from CornerNet's detector weights); leave it null")

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (Hourglass-104 downsamples 7 times)."""
        return 128 if self.backbone == "hourglass104" else 32

    @property
    def min_batch_norm_values(self) -> int:
        """The fewest values per channel that the batch norms at the backbone's deepest level may
        normalise over in training: ``train.batch_size`` (per worker) x (height / input_multiple) x
        (width / input_multiple). Below it the gradients explode (over 2 values batch norm maps any
        two inputs to -1 and +1). Gradient norms of the first steps from scratch, fp32 (bf16 alike),
        measured: ResNet-18 7e4 at 2 values, 1.3e2-2e2 at 4, 9e1 at 8; Hourglass-104, whose
        innermost level stacks more batch norms, inf or 3e17 at 2, 7e5-9e5 at 4, 2e3-3e3 at 8."""
        return 8 if self.backbone == "hourglass104" else 4


@dataclass
class LossConfig:
    alpha: float = _ranged(2.0, ge=0.0, le=10.0)
    beta: float = _ranged(4.0, ge=0.0, le=20.0)
    hm_weight: float = _ranged(1.0, ge=0.0)
    wh_weight: float = _ranged(0.1, ge=0.0)
    off_weight: float = _ranged(1.0, ge=0.0)


@dataclass
class TargetConfig:
    min_overlap: float = _ranged(0.7, gt=0.0, lt=1.0)
    formula: Literal["cornernet", "exact"] = "cornernet"
    max_objects: int = _ranged(128, ge=1)


# Augmentation presets whose crop is the fixed letterbox: the resize is the same every epoch, so
# data.cache keeps it done (the others draw their crop at random)
LETTERBOX_PRESETS = ("flip", "none")


@dataclass
class DataConfig:
    # Dataset root in the standard layout (images/{split}/, annotations/instances_{split}.json).
    # Empty = the synthetic shapes dataset, generated on first use into the cache directory.
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    # Explicit paths override the layout above (e.g. COCO 2017's train2017/ directory).
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    input_size: tuple[int, int] = (512, 512)  # (height, width); multiples of 32
    # centernet_official: the official recipe exactly (discrete scales, border-limited centre, shuffled
    # colour jitter + PCA lighting); centernet: its faster continuous variant; flip; none (data/transforms.py)
    augment: Literal["centernet", "centernet_official", "flip", "none"] = "centernet"
    scale_range: tuple[float, float] = (0.6, 1.4)  # centernet_official: np.arange(low, high, 0.1)
    flip_prob: float = _ranged(0.5, ge=0.0, le=1.0)
    color_jitter: float = _ranged(0.4, ge=0.0, le=1.0)
    synthetic_train_images: int = _ranged(1000, ge=1)
    synthetic_val_images: int = _ranged(200, ge=1)
    synthetic_image_size: int = _ranged(128, ge=32)
    # Ingested Parquet shards (local path or URI), a folder per split; empty = <root>/parquet, or
    # without a root a folder of the cache directory per split, keyed by its images' and annotations' paths.
    parquet_dir: str = ""
    shard_size: int = _ranged(1000, ge=1)
    # Ray Data preprocessing stage: rows per map_batches call, actor pool bounds, CPUs per actor
    # (which nodes it runs on: the cluster section).
    # "actors": a class UDF built once per actor (new actors each epoch's execution);
    # "tasks": pooled worker processes, the Preprocessor cached per process (no per-epoch start-up).
    preprocess_compute: Literal["actors", "tasks"] = "actors"
    preprocess_batch_size: int = _ranged(32, ge=1)
    preprocess_min_actors: int = _ranged(1, ge=1)
    preprocess_max_actors: int = _ranged(4, ge=1)
    preprocess_num_cpus: float = _ranged(1.0, gt=0.0)
    prefetch_batches: int = _ranged(2, ge=0)
    # Training rows come in a new order every epoch, as the official DataLoader(shuffle=True): the
    # Parquet shards (or the cache's blocks) are read in a random order, then each worker draws its
    # batches at random from a buffer of this many batches of rows (0: the blocks' order only).
    # null: 2 with the cache, whose rows are ready; 0 without, where filling the buffer delayed each
    # epoch's first batch from 0.8 s to 2.3-4.0 s on a 2-core machine (BENCHMARKS.md)
    shuffle_buffer_batches: int | None = _ranged(None, ge=0)
    # Decode (and for augment flip/none, letterbox) every image once per cluster and keep the result in
    # Ray's object store; each epoch then runs only the random part (ray_data/cache.py). Refused when the
    # estimate exceeds half the cluster's object store, unless cache_force (Ray spills the rest to disk).
    cache: bool = False
    cache_force: bool = False

    def __post_init__(self) -> None:
        if any(side <= 0 or side % 32 for side in self.input_size):
            raise ConfigError(f"data.input_size must be two positive multiples of 32; got {list(self.input_size)}")
        if self.preprocess_min_actors > self.preprocess_max_actors:
            raise ConfigError("data.preprocess_min_actors must be <= data.preprocess_max_actors; got "
                              f"{self.preprocess_min_actors} > {self.preprocess_max_actors}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high; got {[low, high]}")
        if self.augment == "centernet_official" and low == high:
            raise ConfigError(f"data.scale_range with augment centernet_official is [low, high) stepped by 0.1, "
                              f"so low < high; got {[low, high]}")


@dataclass
class TrainConfig:
    epochs: int = _ranged(140, ge=1)  # with time_limit: the most epochs trained
    # Wall-clock budget in seconds for the whole command (start-up, data, training, the final evaluation
    # and checkpoint), as Ultralytics' `time=`: the epochs that fit are trained, sized from the measured
    # epochs (at first from the steps), with the LR schedule fitted to them. null = train `epochs` epochs.
    time_limit: float | None = _ranged(None, gt=0.0)
    batch_size: int = _ranged(32, ge=1)  # per worker
    num_workers: int = _ranged(1, ge=1)
    use_gpu: bool = False
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    # lr = base_lr * global_batch / base_batch unless lr is given (official: 5e-4 at batch 128)
    lr: float | None = _ranged(None, gt=0.0)
    base_lr: float = _ranged(5e-4, gt=0.0)
    base_batch: int = _ranged(128, ge=1)
    weight_decay: float = _ranged(0.0, ge=0.0)
    schedule: Literal["step", "cosine"] = "step"
    lr_steps: tuple[int, ...] = (90, 120)
    lr_gamma: float = _ranged(0.1, gt=0.0, le=1.0)
    warmup_epochs: float = _ranged(0.0, ge=0.0)
    grad_clip: float | None = _ranged(None, gt=0.0)  # max global gradient norm; None = no clipping (official)
    # An exponential moving average of the weights, evaluated, checkpointed and exported in their
    # place (not in the official recipe). Decay ramps up as decay * (1 - exp(-updates / ema_tau)).
    ema: bool = False
    ema_decay: float = _ranged(0.9998, gt=0.0, lt=1.0)
    ema_tau: float = _ranged(2000.0, gt=0.0)  # updates
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    # torch.compile the model for training (inductor; the first steps compile: up to ~2.5 min on a CPU with
    # a cold cache). Off by default: on the demo it runs at 1.00x of eager on these CPUs (BENCHMARKS.md).
    compile: bool = False
    eval_every: int = _ranged(10, ge=1)
    eval_flip_test: bool = False  # evaluation averages each image's outputs with its mirror's
    checkpoint_every: int = _ranged(10, ge=1)
    seed: int = _ranged(0, ge=0)  # augmentation draws are numpy SeedSequence([seed, epoch, image id])
    max_failures: int = _ranged(1, ge=-1)  # worker failures survived by restarting from the last checkpoint
    # checkpoints and Tune results (path or URI); empty = $CENTERNET_RAY_STORAGE or ./outputs/ray_results
    storage_path: str = ""
    run_name: str = ""

    def __post_init__(self) -> None:
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"train.lr_steps must be increasing epochs; got {list(self.lr_steps)}")


@dataclass
class TuneConfig:
    name: str = ""  # the sweep's name (default sweep-<backbone>); rerunning a name resumes that sweep
    search_space: str = "tune/search_space"  # a YAML path, or a shipped name (`centernet-ray config --list`)
    num_samples: int = _ranged(8, ge=1)  # trials in all, the default-config trial included
    include_default: bool = True  # the first trial trains the base config unchanged (the baseline)
    metric: str = "AP"  # any stat training reports at evaluation epochs (AP, AP50, AR100, ...)
    mode: Literal["max", "min"] = "max"
    search_alg: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = _ranged(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = _ranged(3.0, gt=1.0)
    max_concurrent_trials: int | None = None  # default: as many as the cluster's CPUs/GPUs hold
    seed: int | None = _ranged(None, ge=0)

    def __post_init__(self) -> None:
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"tune.max_concurrent_trials must be >= 1 (or null); got {self.max_concurrent_trials}")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = _ranged(8000, ge=1, le=65535)
    num_replicas: int = _ranged(1, ge=1)  # model replicas (the minimum when autoscaling)
    max_replicas: int | None = None  # > num_replicas turns on autoscaling between the two
    target_ongoing_requests: float = _ranged(2.0, gt=0.0)  # autoscaling target per replica
    num_gpus: float = _ranged(0.0, ge=0.0)  # per model replica
    # the model's precision: "none" (fp32) answers as `centernet-ray predict` does; "bf16" autocast is
    # faster on GPUs and AVX512-BF16 CPUs, its scores differ in the third digit
    amp: Literal["bf16", "fp16", "none"] = "none"
    max_batch_size: int = _ranged(8, ge=1)
    batch_wait_timeout_s: float = _ranged(0.01, ge=0.0)
    # requests one ingress replica holds at once (reading, decoding, waiting for the model). Above it
    # Serve's router backs off: 64 clients on a limit of 32 served 14 req/s where 16 clients got 64
    ingress_max_ongoing_requests: int = _ranged(256, ge=1)
    max_body_bytes: int = _ranged(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = _ranged(40_000_000, ge=1)
    score_threshold: float = _ranged(0.3, ge=0.0, le=1.0)
    max_detections: int = _ranged(100, ge=1)
    # 413 answers read and drop the rest of an oversized body up to this many bytes first, so that
    # clients which send the whole body before reading (Python's urllib) see the 413, not a reset
    max_drain_bytes: int = _ranged(256 * 1024 * 1024, ge=0)
    api_keys_file: str = ""  # one key per line; empty = $CENTERNET_RAY_API_KEYS (comma-separated), else open
    # a models:/NAME@ALIAS checkpoint is re-resolved this often (seconds); a moved alias swaps the
    # replicas' weights in place, without a failed request. 0 = never
    model_poll_s: float = _ranged(30.0, ge=0.0)
    # extra replicas a redeploy may start, in % of each deployment's replicas: at 100 every old
    # replica answers until its replacement is ready (Serve's default, 0, stops it first: requests
    # wait for a replica that is not there, and fail when the old ingress stops). 0 for a cluster
    # with no room for a second model replica (one GPU): a redeploy then pauses the model
    max_surge_percent: int = _ranged(100, ge=0, le=100)


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # empty = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "centernet-ray"
    # register the trained model under this name when set; the version is aliased candidate_alias and
    # takes champion_alias when its ONNX export checks out and its val AP beats the champion's
    registered_model: str = ""
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    export_check_images: int = _ranged(0, ge=0)  # validation images of the export check; 0 = all
    log_model: bool = True  # log the final model with mlflow.pytorch.log_model (a torch.export: seconds)
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on rank 0
    system_metrics_interval_s: float = _ranged(10.0, gt=0.0)  # seconds between two samples


@dataclass
class ClusterConfig:
    # Node pools of a multi-node cluster (cluster/ labels its node groups this way). With node_pools
    # on, every Ray Data task and actor (reads, preprocessing) runs only on nodes labelled
    # {pool_label: cpu_pool} and every train worker only on {pool_label: gpu_pool}. Off: anywhere,
    # e.g. all on one machine (the embedded default).
    node_pools: bool = False
    pool_label: str = "centernet-ray/pool"
    cpu_pool: str = "cpu"
    gpu_pool: str = "gpu"

    def __post_init__(self) -> None:
        if not self.node_pools:
            return
        from centernet_ray.ray_compat import validate_label_selector  # Ray's own label syntax rules

        for name in ("cpu_pool", "gpu_pool"):
            problem = validate_label_selector({self.pool_label: getattr(self, name)})
            if problem:
                raise ConfigError(f"cluster.pool_label / cluster.{name}: {problem}")

    def data_selector(self) -> dict[str, str] | None:
        """Ray node label selector for data tasks and actors; None = no constraint."""
        return {self.pool_label: self.cpu_pool} if self.node_pools else None

    def train_selector(self) -> dict[str, str] | None:
        """Ray node label selector for train workers; None = no constraint."""
        return {self.pool_label: self.gpu_pool} if self.node_pools else None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        multiple = self.model.input_multiple
        if any(side % multiple for side in self.data.input_size):
            raise ConfigError(f"data.input_size must be multiples of {multiple} for {self.model.backbone}; "
                              f"got {list(self.data.input_size)}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flatten(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. ``{"loss.alpha": 2.0}`` (for MLflow params)."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def check_batch_norm_batch(config: Config) -> None:
    """Refuse a per-worker batch whose batch norms at the backbone's deepest level would normalise
    over too few values to train (``ModelConfig.min_batch_norm_values``): every step's gradients
    would explode, and be skipped or applied as noise, in a run that otherwise looks healthy. The
    train job checks it before its ingest; `centernet-ray train` and `tune` before Ray starts."""
    model, (height, width) = config.model, config.data.input_size
    deepest = (height // model.input_multiple, width // model.input_multiple)
    values = config.train.batch_size * deepest[0] * deepest[1]
    if values < model.min_batch_norm_values:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} at data.input_size={[height, width]} is too small for "
            f"{model.backbone}: the batch norms at its deepest level ({deepest[0]}x{deepest[1]}, 1/{model.input_multiple} "
            f"of the input) would normalise over {values} value(s) per channel, and gradients explode below "
            f"{model.min_batch_norm_values}; raise train.batch_size (per worker) or data.input_size")


def resolve_learning_rate(train: TrainConfig) -> float:
    """The explicit ``lr`` or the official linear scaling rule ``base_lr * global_batch / base_batch``."""
    if train.lr is not None:
        return train.lr
    return train.base_lr * train.batch_size * train.num_workers / train.base_batch
