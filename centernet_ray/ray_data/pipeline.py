"""Ray Data glue: Parquet shards -> preprocessing actors on CPU nodes -> Ray Train workers.

The per-row work is :class:`centernet_ray.data.preprocess.Preprocessor`; this module only puts it
on Ray: an actor pool (built once per actor, 1 torch thread each) placed by the config's resources
and node labels, a shared report of dropped rows, and an epoch clock so that each epoch's lazy
re-execution draws new, reproducible augmentations.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import ray
from ray.data import FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig as TrainDataConfig

from centernet_ray import storage
from centernet_ray.config import LETTERBOX_PRESETS, Config, DataConfig
from centernet_ray.console import is_terminal
from centernet_ray.ray_compat import execution_options
from centernet_ray.ray_data.ingest import read_manifest

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class PipelineReport:
    """Counts (and a few examples) of rows the preprocessing stage dropped or repaired."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, problem: str, example: str) -> None:
        self.counts[problem] += 1
        samples = self.examples.setdefault(problem, [])
        if len(samples) < 10:
            samples.append(example)

    def get(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": self.examples}


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the next pipeline execution augments for; train workers set it before each epoch's
    first batch (every rank the same epoch). It lives in the driver and outlives a worker failure:
    an attempt that resumes from an earlier epoch sets it back, so the epochs trained again are
    augmented as they were the first time."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


class RayPreprocessor:
    """:class:`~centernet_ray.data.preprocess.Preprocessor` as a Ray Data actor: reads the epoch once
    at start-up (each epoch's execution starts fresh actors) and forwards dropped rows to the shared
    report.

    torch and the preprocessing code are imported here, not at the top of this module: Ray Data's
    coordinators (the DatasetManager and one SplitCoordinator per dataset) import this module to
    unpickle the stage, and importing torch costs each of them seconds of CPU on the critical path
    to the first batch (BENCHMARKS.md)."""

    def __init__(self, *, report: Any = None, clock: Any = None, method: str = "__call__", **kwargs: Any) -> None:
        import torch

        from centernet_ray.data.preprocess import Preprocessor

        torch.set_num_threads(1)  # one actor = one CPU; parallelism comes from the pool
        if clock is not None:
            kwargs["epoch"] = ray.get(clock.get.remote())
        # Wait for the report to hold each problem before the batch moves on: whoever reads the report
        # after the rows (the driver) then sees every one. Problems are rare, the wait is short.
        on_problem = None if report is None else (lambda problem, example: ray.get(report.add.remote(problem, example)))
        self.preprocessor = Preprocessor(**kwargs, on_problem=on_problem)
        self.run = getattr(self.preprocessor, method)  # the whole stage, or data.cache's prepare / augment part

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.run(batch)


_PROCESS_PREPROCESSORS: dict[tuple, RayPreprocessor] = {}


def preprocess_in_task(batch: dict[str, Any], *, report: Any = None, clock: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Task flavour of the stage: the Preprocessor is built once per worker process and epoch.

    Ray keeps worker processes (and their imports) between executions, so unlike an actor pool,
    which starts new processes for every epoch's execution, this costs nothing per epoch.
    """
    epoch = ray.get(clock.get.remote()) if clock is not None else 0
    # The report is part of the key: a worker process outlives a run, and a preprocessor kept from
    # an earlier run would send this run's dropped rows to that run's report (actor handles compare
    # by actor id).
    key = (epoch, report, *sorted((k, repr(v)) for k, v in kwargs.items()))
    preprocessor = _PROCESS_PREPROCESSORS.get(key)
    if preprocessor is None:
        _PROCESS_PREPROCESSORS.clear()
        preprocessor = _PROCESS_PREPROCESSORS[key] = RayPreprocessor(report=report, epoch=epoch, **kwargs)
    return preprocessor(batch)


def read_rows(parquet_dir: str, rows_per_block: int, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """The ingested rows in blocks of about ``rows_per_block`` rows (one block = one preprocessing
    task, so blocks must be many and small for the pool to work in parallel). With ``shuffle_seed``
    the shards are read in another order at every execution (= epoch), drawn from the seed.

    Read with Ray Data's V1 Parquet datasource: in Ray 2.60 the V2 path adds a ListFiles task that
    delayed the first batch of every execution (= every epoch) by ~8 s here, and merged small shards
    into one block (BENCHMARKS.md).
    """
    manifest = read_manifest(parquet_dir)
    if manifest is None:
        raise FileNotFoundError(f"no ingested dataset at {parquet_dir} (run `centernet-ray data ingest` first)")
    files = [storage.join(parquet_dir, name) for name in manifest["shards"]]
    blocks = max(len(files), -(-manifest["rows"] // rows_per_block))
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2, context.enable_progress_bars
    context.use_datasource_v2 = False
    # the read samples the files behind a progress bar of its own: in a log file, a stray bar line
    context.enable_progress_bars = context.enable_progress_bars and is_terminal()
    try:
        shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
        return ray.data.read_parquet(files, override_num_blocks=blocks, shuffle=shuffle)
    finally:
        context.use_datasource_v2, context.enable_progress_bars = previous


def preprocessed_dataset(parquet_dir: str, config: Config, train: bool, report: Any = None,
                         clock: Any = None) -> ray.data.Dataset:
    """Lazy dataset of preprocessed rows (see ``centernet_ray.data.preprocess`` for the columns).

    Which nodes run it (``cluster.node_pools``) is set for the whole dataset, reads included, by
    :class:`CenterNetDataConfig`'s execution options, not per stage."""
    rows = read_rows(parquet_dir, config.data.preprocess_batch_size, config.train.seed if train else None)
    return preprocess_stage(rows, config, train=train, report=report, clock=clock if train else None)


def training_datasets(train_dir: str, val_dir: str, config: Config, report: Any = None,
                      clock: Any = None) -> dict[str, ray.data.Dataset]:
    """The ``train`` and ``val`` datasets a training run reads: preprocessed every epoch from the
    Parquet rows, or with ``data.cache`` from the cache in Ray's object store (``cache.py``)."""
    if config.data.cache:
        from centernet_ray.ray_data.cache import cached_datasets

        datasets = cached_datasets(train_dir, val_dir, config, report=report, clock=clock)
    else:
        datasets = {"train": preprocessed_dataset(train_dir, config, train=True, report=report, clock=clock),
                    "val": preprocessed_dataset(val_dir, config, train=False, report=report)}
    for dataset in datasets.values():
        # Each epoch's execution would log Ray Data's progress, a block of lines every 10 s, when the
        # output is not a terminal, and its start and plan (two lines, the same every epoch); the
        # trainer's own progress line gives throughput and data wait.
        dataset.context.enable_progress_bars = dataset.context.enable_progress_bars and is_terminal()
        dataset.context.print_on_execution_start = False
    return datasets


def preprocessor_arguments(config: Config, *, train: bool, max_objects: int | None = None) -> dict[str, Any]:
    """The :class:`~centernet_ray.data.preprocess.Preprocessor` settings of ``config``."""
    data = config.data
    return dict(input_size=data.input_size, train=train, augment=data.augment, scale_range=data.scale_range,
                flip_prob=data.flip_prob, color_jitter=data.color_jitter, seed=config.train.seed,
                max_objects=config.targets.max_objects if max_objects is None else max_objects)


def preprocessing_min_cpus(data: DataConfig) -> float:
    """The CPUs the preprocessing stage cannot run with fewer of: its minimum of actors, or one task,
    at ``data.preprocess_num_cpus`` each."""
    return data.preprocess_num_cpus * (data.preprocess_min_actors if data.preprocess_compute == "actors" else 1)


def preprocess_stage(rows: ray.data.Dataset, config: Config, *, train: bool, report: Any = None, clock: Any = None,
                     batch_size: int | None = None, max_objects: int | None = None,
                     label_selector: dict[str, str] | None = None, method: str = "__call__") -> ray.data.Dataset:
    """``rows`` (ingested rows: ``image`` bytes, ``image_id``, ``boxes``, ``labels``) through the
    preprocessing stage as ``config.data`` runs it: tasks or an actor pool (``preprocess_compute``),
    ``preprocess_num_cpus`` each, ``preprocess_batch_size`` rows per call unless ``batch_size``;
    ``label_selector`` pins it to a node pool when the caller does not set it dataset-wide;
    ``method``: the ``Preprocessor``'s whole stage, or ``prepare``/``augment`` (``data.cache``)."""
    data = config.data
    batch_size = batch_size or data.preprocess_batch_size
    arguments = dict(preprocessor_arguments(config, train=train, max_objects=max_objects), report=report, clock=clock,
                     method=method)
    placement = {"num_cpus": data.preprocess_num_cpus, "label_selector": label_selector}  # None: anywhere
    if data.preprocess_compute == "tasks":
        return rows.map_batches(preprocess_in_task, fn_kwargs=arguments, batch_size=batch_size, batch_format="numpy",
                                compute=ray.data.TaskPoolStrategy(size=data.preprocess_max_actors), **placement)
    return rows.map_batches(
        RayPreprocessor, fn_constructor_kwargs=arguments, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=data.preprocess_min_actors, max_size=data.preprocess_max_actors),
        **placement)


class CenterNetDataConfig(TrainDataConfig):
    """Train rows split equally across workers (DDP needs equal step counts); validation rows
    split unequally so that every image is evaluated exactly once. With ``label_selector`` every
    task and actor the datasets launch (reads, preprocessing) is pinned to matching nodes."""

    def __init__(self, label_selector: dict[str, str] | None = None) -> None:
        super().__init__()
        self.label_selector = label_selector

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = execution_options(self, name)
            options.label_selector = self.label_selector
            dataset.context.execution_options = options
            splits = dataset.streaming_split(world_size, equal=(name == "train"), locality_hints=worker_node_ids)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


class NumpyCollate(NumpyBatchCollateFn):
    """A collate callable (``TargetCollate``) as the class ``iter_torch_batches`` asks for since Ray
    2.47 (a plain callable still works, with a deprecation warning in every run): numpy batches in."""

    def __init__(self, collate: Callable[[dict[str, Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: dict[str, Any]) -> Any:
        return self.collate(batch)


def augments_on_the_trainer(config: Config) -> bool:
    """Whether the train rows arrive un-augmented and each trainer flips them itself: with
    ``data.cache`` and a letterboxing preset, where the per-epoch work is a coin toss and a flip per
    row, less than what a Ray task costs to carry the row (BENCHMARKS.md). The cropping presets
    resample whole images every epoch: that stays on the CPU nodes."""
    return config.data.cache and config.data.augment in LETTERBOX_PRESETS


class AugmentThenCollate:
    """``Preprocessor.augment`` for ``epoch`` (the same rows as the augmentation tasks would give),
    then the collate."""

    def __init__(self, config: Config, epoch: int, collate: Callable[[dict[str, Any]], Any]) -> None:
        from centernet_ray.data.preprocess import Preprocessor

        self.augment = Preprocessor(**preprocessor_arguments(config, train=True), epoch=epoch).augment
        self.collate = collate

    def __call__(self, batch: dict[str, Any]) -> Any:
        return self.collate(self.augment(batch))


def shuffle_buffer_batches(config: Config) -> int:
    """``data.shuffle_buffer_batches``, its default resolved: 2 batches over the cache, none without."""
    chosen = config.data.shuffle_buffer_batches
    return chosen if chosen is not None else (2 if config.data.cache else 0)


def open_shards(names: tuple[str, ...] = ("train", "val")) -> None:
    """Inside a Ray Train worker, first thing: ask for this worker's shard of each dataset. Ray Train
    starts a dataset's split coordinator (a new process that imports Ray Data) at the first request
    for its shard, and the request returns at once: asked for here, both start while the worker
    builds its model and opens its MLflow run, where asked for at the first epoch and the first
    evaluation each start was waited for (1-3 s a run on 2 cores). Every worker calls this: the
    other ranks' requests wait for rank 0's, which makes the splits; later requests get the same
    shards."""
    import ray.train

    for name in names:
        ray.train.get_dataset_shard(name)


def shard_batches(name: str, config: Config, num_classes: int, batch_size: int, epoch: int = 0):
    """Inside a Ray Train worker: this worker's split of dataset ``name`` as collated torch batches
    (see :class:`TargetCollate`: sparse for training on a GPU), prefetched ``data.prefetch_batches``
    ahead, in pinned memory on a GPU node; ``epoch``: the training epoch they are for, which the
    trainer's own augmentation draws from (:func:`augments_on_the_trainer`)."""
    import ray.train

    from centernet_ray.targets import TargetCollate

    shard = ray.train.get_dataset_shard(name)
    # On a GPU the train batches stay sparse and pinned: the engine renders the targets on the device
    on_device = config.train.use_gpu and name == "train"
    collate = TargetCollate(config, num_classes, not on_device)
    if name == "train" and augments_on_the_trainer(config):
        collate = AugmentThenCollate(config, epoch, collate)
    shuffle, buffered = {}, shuffle_buffer_batches(config)
    if name == "train" and buffered:  # a different draw every epoch, from the seed
        shuffle = {"local_shuffle_buffer_size": buffered * batch_size,
                   "local_shuffle_seed": config.train.seed * 100_003 + epoch}
    # drop_last for training: every epoch is the steps the schedule counts (rows // workers // batch),
    # never a short batch at the end (the official loader's drop_last=True)
    return shard.iter_torch_batches(batch_size=batch_size, collate_fn=NumpyCollate(collate), device="cpu",
                                    prefetch_batches=config.data.prefetch_batches, pin_memory=config.train.use_gpu,
                                    drop_last=name == "train", **shuffle)
