"""The Ray-free training engine: one step, skipped non-finite steps (also under DDP), one epoch."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from centernet_ray.config import load_config
from centernet_ray.targets import encode_targets
from centernet_ray.training.engine import MAX_CONSECUTIVE_NONFINITE, NonFiniteLossError, TrainingEngine

OVERRIDES = ["model.width=0.25", "model.neck_channels=[16,16,16]", "model.head_conv=8", "data.input_size=[64,64]",
             "targets.max_objects=4", "train.amp=none", "train.lr=1e-3", "train.optimizer=adam"]


def tiny_batch(seed: int = 0, nan_size: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    encoded = encode_targets(torch.tensor([[2.0, 3.0, 9.0, 12.0]]).numpy(), torch.tensor([1]).numpy(), 2, (16, 16), 4)
    targets = {k: torch.as_tensor(encoded[k])[None].repeat(2, *([1] * encoded[k].ndim))
               for k in ("heatmap", "index", "mask", "size", "offset")}
    if nan_size:
        targets["size"][0, 0, 0] = math.nan
    return {"image": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=generator), "targets": targets}


def test_a_step_updates_the_weights_and_advances_the_schedule():
    torch.manual_seed(0)
    engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10)
    before = [p.detach().clone() for p in engine.model.parameters()]
    result = engine.step(tiny_batch())
    assert result.finite and result.images == 2 and set(result.terms) == {"total", "heatmap", "size", "offset"}
    assert engine.global_step == 1 and engine.scheduler.last_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))


def test_non_finite_steps_are_skipped_counted_and_abort_after_too_many_in_a_row():
    torch.manual_seed(0)
    engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10)
    before = [p.detach().clone() for p in engine.model.parameters()]
    result = engine.step(tiny_batch(nan_size=True))
    assert not result.finite and engine.nonfinite_steps == 1 and engine.global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    engine.step(tiny_batch())  # a good step resets the run of bad ones
    assert engine.consecutive_nonfinite == 0
    engine.check_finite()  # one skipped step: a warning, no error
    for _ in range(MAX_CONSECUTIVE_NONFINITE):
        engine.step(tiny_batch(nan_size=True))
    with pytest.raises(NonFiniteLossError, match="consecutive steps"):  # surfaced where the host looks
        engine.check_finite()


def test_train_epoch_averages_the_finite_steps_and_reports_progress():
    torch.manual_seed(0)
    engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=3)
    seen = []
    result = engine.train_epoch([tiny_batch(1), tiny_batch(2, nan_size=True), tiny_batch(3)], epoch=0, log_every=1,
                                steps_per_epoch=3, on_progress=seen.append)
    assert (result.steps, result.images) == (2, 6) and engine.global_step == 3  # every image went through
    assert [p.step for p in seen] == [1, 2, 3] and math.isfinite(result.mean_terms["total"])
    assert engine.nonfinite_steps == 1


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10)
        engine.wrap(torch.nn.parallel.DistributedDataParallel)
        first = engine.step(tiny_batch(rank, nan_size=rank == 1))  # only rank 1's loss is NaN
        second = engine.step(tiny_batch(rank + 2))
        flat = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
        epoch = engine.train_epoch([tiny_batch(rank + 4), tiny_batch(rank + 6)], epoch=0)  # each rank its own batches
        torch.save((bool(first.finite), bool(second.finite), engine.nonfinite_steps, flat, epoch.mean_terms["total"]),
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # spawns two processes and a gloo process group: ~8 s, kept out of the unit subset
@pytest.mark.timeout(120)  # without the agreement the ranks' collectives mismatch: a hang or a failure
def test_under_ddp_every_rank_skips_a_step_that_is_non_finite_on_one(free_ports, tmp_path):
    # Results come back through files: a multiprocessing Manager would fork this process, and a fork
    # of a process that holds a Ray driver connection (the session's local Ray) breaks that connection.
    mp.spawn(_ddp_worker, args=(free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0][:3] == results[1][:3] == (False, True, 1)
    torch.testing.assert_close(results[0][3], results[1][3], rtol=0, atol=0)  # replicas stayed in step
    assert results[0][4] == results[1][4]  # the epoch's loss is every rank's mean, not each rank's own


HOST_READS = ("item", "__float__", "__bool__", "__int__", "cpu", "tolist", "numpy")


def test_the_step_reads_nothing_back_from_the_device(monkeypatch):
    """Between log intervals a step must not wait for the device: no Tensor method that copies a
    value to the host runs during 6 steps, a skipped non-finite one included (counted here on the
    CPU, where the same calls would be synchronisations on a GPU); the one read is the check."""
    torch.manual_seed(0)
    engine = TrainingEngine(load_config(None, [*OVERRIDES, "train.grad_clip=35"]), num_classes=2, steps_per_epoch=10)
    batches = [tiny_batch(i, nan_size=i == 3) for i in range(6)]
    engine.step(batches[0])  # the optimizer's state is created on the first step
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    results = [engine.step(batch) for batch in batches[1:]]
    assert reads == [], reads
    engine.check_finite()
    assert reads  # the check does read, once per interval
    monkeypatch.undo()
    assert [bool(r.finite) for r in results] == [True, True, False, True, True] and engine.nonfinite_steps == 1


def test_a_sparse_batch_trains_exactly_as_its_rendered_targets():
    """On an accelerator the collate leaves the boxes sparse and the engine renders the targets on
    its device: the same loss and the same update as the collate's dense targets (here on the CPU)."""
    from centernet_ray.targets import TargetCollate

    config = load_config(None, OVERRIDES)
    generator = torch.Generator().manual_seed(0)
    rows = {"image": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=generator).numpy(),
            "boxes": torch.tensor([[[2.0, 3.0, 9.0, 12.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                                   [[1.0, 1.0, 15.5, 6.0], [4.0, 4.0, 14.0, 14.0], [0, 0, 0, 0], [0, 0, 0, 0]]]).numpy(),
            "classes": torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32).numpy(),
            "num_boxes": torch.tensor([1, 2], dtype=torch.int32).numpy(), "image_id": torch.tensor([1, 2]).numpy(),
            "input_to_original": torch.zeros(2, 2, 3).numpy(), "original_size": torch.ones(2, 2).numpy()}
    dense, sparse = TargetCollate(config, 2)(rows), TargetCollate(config, 2, render=False)(rows)
    assert "targets" not in sparse and sparse["boxes"].shape == (2, 4, 4)
    results, weights = [], []
    for batch in (dense, sparse):
        torch.manual_seed(0)
        engine = TrainingEngine(config, num_classes=2, steps_per_epoch=10)
        results.append(engine.step(batch))
        weights.append(torch.cat([p.detach().reshape(-1) for p in engine.model.parameters()]))
    for key in results[0].terms:
        torch.testing.assert_close(results[0].terms[key], results[1].terms[key], rtol=0, atol=0)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_train_compile_puts_the_training_forward_through_torch_compile_only():
    """train.compile: the training forward goes through torch.compile (compiled lazily, at the first
    step: up to ~2.5 min on a CPU, so no step is run here; BENCHMARKS.md has the measured run); the module
    that is evaluated, checkpointed and exported stays the plain one."""
    engine = TrainingEngine(load_config(None, [*OVERRIDES, "train.compile=true"]), num_classes=2, steps_per_epoch=10)
    assert type(engine.compiled).__name__ == "OptimizedModule" and engine.compiled._orig_mod is engine.model
    assert type(engine.evaluated_module).__name__ == "CenterNet"
    assert TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10).compiled is None


def _checkpointed(engine, config, epoch, tmp_path, metrics=None):
    from centernet_ray.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint

    state = checkpoint_state(engine.model, config, ["a", "b"], [1, 2], epoch, engine.optimizer, engine.scheduler,
                             engine.scaler, metrics)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    return load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_resumed_engine_takes_the_next_step_exactly_as_the_uninterrupted_one(tmp_path):
    """Weights, Adam's moments, the schedule's position and its time-budget fit (the plan recorded in
    the checkpoint's metrics, read back by ``budget.resumed_plan``) all come back: the next step's
    learning rate and update are the same, bit for bit. A cosine over 100 epochs fitted to 10.6."""
    from centernet_ray.training.budget import resumed_plan

    config = load_config(None, [*OVERRIDES, "train.schedule=cosine", "train.epochs=100"])
    torch.manual_seed(0)
    engine = TrainingEngine(config, num_classes=2, steps_per_epoch=3)
    engine.fit_schedule(10.6)
    for seed in range(6):  # two epochs of 3 steps
        engine.step(tiny_batch(seed))
    state = _checkpointed(engine, config, 2, tmp_path, {"planned_epochs": 11, "planned_last_epoch_steps": 2})
    resumed = TrainingEngine(config, num_classes=2, steps_per_epoch=3)
    resumed.load_state(state, steps_per_epoch=3)
    assert resumed_plan(state["metrics"]) == (11, 2) and resumed_plan({"planned_epochs": 100.0}) is None
    resumed.fit_schedule(10 + 2 / 3)  # what the loop's _Schedule.resume sets: 10 whole epochs and 2 of 3 steps
    engine.fit_schedule(10 + 2 / 3)
    assert resumed.global_step == engine.global_step == resumed.scheduler.last_epoch == 6
    for ours in (engine, resumed):
        ours.step(tiny_batch(6))
    assert resumed.optimizer.param_groups[0]["lr"] == engine.optimizer.param_groups[0]["lr"]
    assert resumed.optimizer.param_groups[0]["lr"] < 0.99 * 1e-3  # on the fitted cosine, not the 100-epoch one
    for a, b in zip(engine.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)


def test_resuming_with_fp16_from_a_checkpoint_without_a_loss_scale_starts_it_afresh(tmp_path):
    config = load_config(None, OVERRIDES)
    engine = TrainingEngine(config, num_classes=2, steps_per_epoch=3)  # amp none: the scaler saves {}
    state = _checkpointed(engine, config, 1, tmp_path)
    assert state["scaler"] == {}
    resumed = TrainingEngine(config, num_classes=2, steps_per_epoch=3)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)  # train.amp=fp16 on a GPU, rerun
    resumed.load_state(state, steps_per_epoch=3)  # raised "The source state dict is empty"
    assert resumed.scaler.get_scale() == 65536.0


def test_gradscaler_overflow_skips_under_fp16_are_not_counted_as_divergence():
    """fp16 on a GPU: GradScaler starts at 2**16 and halves its scale at each overflow, skipping that
    step; the engine counted those routine skips as non-finite steps (warnings, and an abort after
    MAX_CONSECUTIVE_NONFINITE in a row). Here a CPU GradScaler starting far too high overflows."""
    torch.manual_seed(0)
    engine = TrainingEngine(load_config(None, OVERRIDES), num_classes=2, steps_per_epoch=10)
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, enabled=True)
    before = [p.detach().clone() for p in engine.model.parameters()]
    result = engine.step(tiny_batch())
    assert not bool(result.finite) and engine.scaler.get_scale() < 2.0 ** 127  # skipped: the scale came down
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.nonfinite_steps == 0 and engine.consecutive_nonfinite == 0
