"""Ray Data pipeline on a real local Ray: ingest -> Parquet -> preprocessing actors -> batches."""

import threading

import torch

import numpy as np
import pytest

from centernet_ray.config import load_config
from centernet_ray.ray_data.ingest import ingest_coco
from centernet_ray.targets import encode_targets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parquet(shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet")
    for split in ("train", "val"):
        ingest_coco(str(shapes_dataset / "images" / split), str(shapes_dataset / "annotations" / f"instances_{split}.json"),
                    str(out / split), shard_size=8)
    return out


SMALL = ["data.input_size=[64,64]", "targets.max_objects=8", "data.preprocess_batch_size=8", "data.preprocess_max_actors=2"]


@pytest.fixture
def config():
    """The stage as an actor pool (the default ``data.preprocess_compute``)."""
    return load_config(None, SMALL)


@pytest.fixture
def task_config():
    """The stage as tasks (the demo's flavour): Ray's pooled worker processes, which keep their
    imports, instead of new actor processes for every execution."""
    return load_config(None, [*SMALL, "data.preprocess_compute=tasks"])


def epoch_images(dataset, transform=lambda batch: batch):
    batches = [transform(b) for b in dataset.iter_batches(batch_size=None, batch_format="numpy")]
    return {int(i): (img, box) for b in batches for i, img, box in zip(b["image_id"], b["image"], b["boxes"])}


def test_preprocessed_batches_have_documented_shapes_and_targets_match_encode_targets(ray_session, parquet, config):
    from centernet_ray.ray_data.pipeline import preprocessed_dataset
    from centernet_ray.targets import TargetCollate

    dataset = preprocessed_dataset(str(parquet / "train"), config, train=True)
    batch = next(iter(dataset.iter_batches(batch_size=6, batch_format="numpy")))
    assert batch["image"].shape == (6, 3, 64, 64) and batch["image"].dtype == np.uint8
    assert batch["boxes"].shape == (6, 8, 4) and batch["classes"].shape == (6, 8)
    collated = TargetCollate(config, num_classes=4)(batch)
    assert collated["targets"]["heatmap"].shape == (6, 4, 16, 16)
    for j in range(6):
        count = batch["num_boxes"][j]
        ref = encode_targets(batch["boxes"][j, :count], batch["classes"][j, :count], 4, (16, 16), 8)
        for key in ("heatmap", "index", "mask", "size", "offset"):
            np.testing.assert_array_equal(collated["targets"][key][j].numpy(), ref[key])


def test_each_epoch_draws_new_augmentations_and_a_seed_repeats_them(ray_session, parquet):
    from centernet_ray.ray_data.pipeline import EpochClock, preprocessed_dataset

    # one actor per execution: each reads the epoch when it starts, and each of the four executions
    # here starts its own (a second would only import torch and torchvision again, ~4 CPU-s)
    config = load_config(None, [*SMALL, "data.preprocess_max_actors=1"])
    clock = EpochClock.remote()
    dataset = preprocessed_dataset(str(parquet / "train"), config, train=True, clock=clock)
    epoch0 = epoch_images(dataset)
    ray_session.get(clock.set_epoch.remote(1))
    epoch1 = epoch_images(dataset)
    assert len(epoch0) == 24 and epoch0.keys() == epoch1.keys()
    assert sum(not np.array_equal(epoch0[k][0], epoch1[k][0]) for k in epoch0) >= 20
    replay = epoch_images(preprocessed_dataset(str(parquet / "train"), config, train=True, clock=EpochClock.remote()))
    assert all(np.array_equal(epoch0[k][0], replay[k][0]) and np.array_equal(epoch0[k][1], replay[k][1]) for k in epoch0)
    ray_session.get(clock.set_epoch.remote(0))  # a restart that resumes from an earlier epoch: as the first time
    again = epoch_images(dataset)
    assert all(np.array_equal(epoch0[k][0], again[k][0]) and np.array_equal(epoch0[k][1], again[k][1]) for k in epoch0)


def test_bad_rows_are_dropped_and_reported(ray_session, parquet, task_config, tmp_path):
    config = task_config
    import pyarrow as pa
    import pyarrow.parquet as pq

    from centernet_ray.ray_data.pipeline import PipelineReport, preprocessed_dataset

    table = pq.read_table(parquet / "val").to_pylist()
    table[0]["image"] = b"corrupt"
    table[1]["boxes"] = [float("nan"), 0.0, 4.0, 4.0] + table[1]["boxes"][4:]
    out = tmp_path / "bad"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(next((parquet / "val").glob("part-*.parquet")))),
                   out / "part-00000.parquet")
    (out / "_manifest.json").write_text('{"shards": ["part-00000.parquet"], "rows": 12}')
    report = PipelineReport.remote()
    rows = epoch_images(preprocessed_dataset(str(out), config, train=False, report=report))
    assert len(rows) == 11
    summary = ray_session.get(report.get.remote())
    assert summary["counts"] == {"unreadable_images": 1, "dropped_invalid_boxes": 1}
    assert "image_id=" in summary["examples"]["unreadable_images"][0]


def test_validation_split_gives_every_image_to_exactly_one_worker(ray_session, parquet, task_config):
    config = task_config
    from centernet_ray.ray_data.pipeline import CenterNetDataConfig, preprocessed_dataset

    datasets = {"train": preprocessed_dataset(str(parquet / "train"), config, train=True),
                "val": preprocessed_dataset(str(parquet / "val"), config, train=False)}
    shards = CenterNetDataConfig().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    seen: dict[str, list[list[int]]] = {"train": [[], []], "val": [[], []]}

    def consume(rank):
        for name in ("val", "train"):
            for batch in shards[rank][name].iter_batches(batch_size=4, batch_format="numpy"):
                seen[name][rank].extend(int(i) for i in batch["image_id"])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    val_ids = seen["val"][0] + seen["val"][1]
    assert sorted(val_ids) == list(range(1, 13))  # each of the 12 val images exactly once
    assert len(seen["train"][0]) == len(seen["train"][1])  # equal split for DDP


def test_torch_trainer_workers_stream_their_shards_with_collated_targets(ray_session, parquet, task_config, tmp_path):
    from centernet_ray.config import with_overrides

    config = with_overrides(task_config.to_dict(), ["data.shuffle_buffer_batches=2"])  # the buffer (the cache's default)
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from centernet_ray.ray_data.pipeline import CenterNetDataConfig, preprocessed_dataset, shard_batches

    def loop(loop_config):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        seen = {"train": [[], []], "val": []}
        for epoch in (0, 1):  # 12 rows a rank: two batches of 5, the short third dropped
            for batch in shard_batches("train", loop_config["config"], num_classes=4, batch_size=5, epoch=epoch):
                assert batch["image"].dtype == torch.uint8 and batch["targets"]["heatmap"].shape[1:] == (4, 16, 16)
                assert batch["targets"]["index"].dtype == torch.int64 and len(batch["image_id"]) == 5
                seen["train"][epoch] += batch["image_id"].tolist()
        for batch in shard_batches("val", loop_config["config"], num_classes=4, batch_size=5):
            seen["val"] += batch["image_id"].tolist()
        (loop_config["out"] / f"rank{rank}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        loop, train_loop_config={"config": config, "out": tmp_path},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": preprocessed_dataset(str(parquet / "train"), config, train=True),
                  "val": preprocessed_dataset(str(parquet / "val"), config, train=False)},
        dataset_config=CenterNetDataConfig(),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(1, 13))  # every image once, short batches kept
    for rank in ranks:
        assert [len(epoch) for epoch in rank["train"]] == [10, 10]
        assert rank["train"][0] != rank["train"][1]  # a new order every epoch (shards, then the shuffle buffer)
    assert len(set(ranks[0]["train"][0] + ranks[1]["train"][0])) == 20  # one epoch: no image on both ranks


def test_training_shards_are_read_in_a_new_order_every_execution_from_the_seed(ray_session, parquet):
    from ray.data import DataContext

    from centernet_ray.ray_data.pipeline import read_rows

    context = DataContext.get_current()
    kept = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the output in the read order, for the test to see it
    try:
        def first_ids(shuffle_seed):  # the first image of each shard (8 rows a shard, 3 shards), 3 executions
            rows = read_rows(str(parquet / "train"), 8, shuffle_seed)
            return [tuple(int(b["image_id"][0]) for b in rows.iter_batches(batch_size=8)) for _ in range(3)]

        shuffled = first_ids(0)
        assert len(set(shuffled)) > 1 and all(sorted(order) == [1, 9, 17] for order in shuffled)
        assert first_ids(0) == shuffled  # the seed repeats the orders
        assert first_ids(None) == [(1, 9, 17)] * 3  # validation: as ingested
    finally:
        context.execution_options.preserve_order = kept


@pytest.mark.parametrize("augment", ["flip", "centernet"])
def test_the_cached_pipeline_yields_the_uncached_pipeline_s_rows_every_epoch(ray_session, parquet, augment,
                                                                             monkeypatch, capsys):
    """data.cache: decoded once into the object store, augmented per epoch: epoch by epoch the same
    rows as the uncached stage (same seed), new augmentations each epoch, validation cached whole.
    flip: the cached rows go to the trainers as they are, and each flips its own (the collate of
    ``shard_batches``); centernet: one augmentation task per epoch hands its 24 rows on in blocks of
    about AUGMENT_BLOCK_ROWS."""
    from centernet_ray.ray_data import cache
    from centernet_ray.ray_data.pipeline import (AugmentThenCollate, EpochClock, PipelineReport, augments_on_the_trainer,
                                                 preprocessed_dataset, training_datasets)

    monkeypatch.setattr(cache, "AUGMENT_BLOCK_ROWS", 8)
    config = load_config(None, [*SMALL, "data.preprocess_compute=tasks", f"data.augment={augment}", "data.cache=true"])
    on_trainer = augments_on_the_trainer(config)
    assert on_trainer == (augment == "flip")
    clock, report = EpochClock.remote(), PipelineReport.remote()
    cached = training_datasets(str(parquet / "train"), str(parquet / "val"), config, report=report, clock=clock)
    assert type(cached["val"]).__name__ == "MaterializedDataset"
    capsys.readouterr()
    cached["train"].explain()  # flip: the cached blocks, reordered each epoch; no Ray Data stage per epoch
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "RandomizeBlockOrder" in plan and ("MapOperator" in plan) != on_trainer, plan
    uncached_clock = EpochClock.remote()
    uncached = preprocessed_dataset(str(parquet / "train"), config, train=True, clock=uncached_clock)
    for epoch in (0, 1):
        ray_session.get([clock.set_epoch.remote(epoch), uncached_clock.set_epoch.remote(epoch)])
        # flip: what the trainer's collate makes of the rows, before the targets
        got = epoch_images(cached["train"], AugmentThenCollate(config, epoch, collate=lambda batch: batch)
                           if on_trainer else lambda batch: batch)
        expected = epoch_images(uncached)
        assert got.keys() == expected.keys() and len(got) == 24
        for key in got:
            np.testing.assert_array_equal(got[key][0], expected[key][0])
            np.testing.assert_array_equal(got[key][1], expected[key][1])
        if epoch == 0:
            first = got
    assert sum(not np.array_equal(first[k][0], got[k][0]) for k in got) >= 4  # flip: half of them, by chance
    assert cached["train"].materialize().num_blocks() == 3  # 8 or 9, 8 or 9, the rest
    val = epoch_images(preprocessed_dataset(str(parquet / "val"), config, train=False))
    cached_val = epoch_images(cached["val"])
    assert cached_val.keys() == val.keys() and all(np.array_equal(cached_val[k][0], val[k][0]) for k in val)
    assert ray_session.get(report.get.remote())["counts"] == {}


def test_a_cache_larger_than_half_the_object_store_is_refused_unless_forced(ray_session, parquet, caplog):
    from centernet_ray.errors import UserInputError
    from centernet_ray.ray_data.cache import check_fits, estimate_bytes

    import pyarrow.parquet as pq

    boxes = sum(len(v) for v in pq.read_table(parquet / "train", columns=["labels"]).column("labels").to_pylist())
    flip = load_config(None, [*SMALL, "data.augment=flip"])  # letterboxed once: input-size pixels
    assert estimate_bytes(str(parquet / "train"), flip, True) == 24 * 3 * 64 * 64 + 24 * boxes
    crop = load_config(None, [*SMALL, "data.augment=centernet"])  # the whole 96 x 96 image is kept
    assert estimate_bytes(str(parquet / "train"), crop, True) == 24 * 3 * 96 * 96 + 24 * boxes
    assert estimate_bytes(str(parquet / "val"), crop, False) == 12 * 3 * 64 * 64 + 24 * sum(
        len(v) for v in pq.read_table(parquet / "val", columns=["labels"]).column("labels").to_pylist())
    store = ray_session.cluster_resources()["object_store_memory"]
    with pytest.raises(UserInputError, match="data.cache_force=true"):
        check_fits(int(store), force=False)
    check_fits(int(store), force=True)
    assert "spill" in caplog.text
