"""The per-worker training loop run by ``TorchTrainer`` (DDP through Ray Train)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from centernet_ray import storage
from centernet_ray.checkpoint import CHECKPOINT_FILE, checkpoint_state, load_checkpoint, save_checkpoint
from centernet_ray.config import config_from_dict
from centernet_ray.data.transforms import normalize_images
from centernet_ray.drawing import draw_detections, save_png_grid
from centernet_ray.inference import Detector
from centernet_ray.losses import CenterNetLoss
from centernet_ray.model import IMAGE_MEAN, IMAGE_STD, build_model
from centernet_ray.pipeline import shard_batches
from centernet_ray.precision import autocast_dtype
from centernet_ray.training.evaluate import detect_shard, gather_and_score
from centernet_ray.training.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 20
LOSS_TERMS = ("total", "heatmap", "size", "offset")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many consecutive steps: training has diverged."""


def _draw_predictions(kept: list[tuple], class_names: list[str], path: Path) -> Path:
    pictures = []
    for image, matrix, det in kept:
        keep = det.scores > 0.3
        boxes = torch.as_tensor(det.boxes[keep]).clone()
        # original pixels -> the letterboxed input shown here (inverse of input_to_original)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - matrix[0, 2]) / matrix[0, 0]
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - matrix[1, 2]) / matrix[1, 1]
        pictures.append(draw_detections(image, boxes, det.classes[keep], class_names, det.scores[keep]))
    return save_png_grid(pictures, path)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = config_from_dict(loop_config["config"])
    meta = loop_config["meta"]
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(train.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, loop_config.get("threads_per_worker", 1)))

    model = build_model(config.model, meta["num_classes"]).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, meta["steps_per_epoch"])
    amp_dtype = autocast_dtype(train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = CenterNetLoss.from_config(config.loss)

    start_epoch, best_ap, mlflow_run_id, restored_metrics = 0, -1.0, None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        best_ap = state["metrics"].get("best_AP", -1.0)
        mlflow_run_id = state.get("mlflow_run_id")
        restored_metrics = dict(state["metrics"], mlflow_run_id=mlflow_run_id)
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d", start_epoch)
    if start_epoch >= train.epochs:  # a finished run rerun under the same name: report, do not retrain
        ray.train.report(restored_metrics)
        return
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) + device placement

    tracker = None
    if rank == 0:
        from centernet_ray.training.tracking import RunTracker

        tracker = RunTracker(config, meta["run_name"], mlflow_run_id, meta.get("mlflow_parent_run_id"),
                             meta.get("mlflow_tags"))
    ground_truth = None
    if rank == 0:
        import json

        ground_truth = json.loads(storage.read_bytes(meta["val_annotations"]))

    clock = loop_config.get("clock")
    global_step = start_epoch * meta["steps_per_epoch"]
    nonfinite = consecutive_nonfinite = 0
    total_steps = train.epochs * meta["steps_per_epoch"]
    started = time.perf_counter()

    for epoch in range(start_epoch, train.epochs):
        if clock is not None:
            ray.get(clock.advance_to.remote(epoch))
        if loop_config.get("epoch_log"):  # test hook: which epochs each rank actually ran
            with open(loop_config["epoch_log"], "a") as handle:
                handle.write(f"{rank} {epoch}\n")
        if loop_config.get("fail_at_epoch") == epoch and rank == 0 and checkpoint is None:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook train_loop_config['fail_at_epoch'])")
        model.train()
        sums = {k: 0.0 for k in LOSS_TERMS}
        steps = images_seen = 0
        data_wait = 0.0
        epoch_start = tick = time.perf_counter()
        for batch in shard_batches("train", config, meta["num_classes"], train.batch_size):
            data_wait += time.perf_counter() - tick
            images = normalize_images(batch["image"].to(device, non_blocking=True), IMAGE_MEAN, IMAGE_STD)
            images = images.contiguous(memory_format=torch.channels_last)
            targets = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items()}
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images)
            terms = criterion({k: v.float() for k, v in outputs.items()}, targets)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(terms["total"]):
                nonfinite += 1
                consecutive_nonfinite += 1
                log.warning("rank %d: non-finite loss at step %d (skipped; %d so far)", rank, global_step, nonfinite)
                if consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                    raise NonFiniteLossError(
                        f"the loss was NaN/inf for {consecutive_nonfinite} consecutive steps: training diverged. "
                        "Lower train.lr / train.base_lr, raise train.warmup_epochs, or set train.amp=none.")
                scheduler.step()
                global_step += 1
                tick = time.perf_counter()
                continue
            consecutive_nonfinite = 0
            scaler.scale(terms["total"]).backward()
            if train.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            steps += 1
            images_seen += len(images)
            for key in LOSS_TERMS:
                sums[key] += float(terms[key].detach())
            tick = time.perf_counter()
            if rank == 0 and (steps % loop_config.get("log_every", 20) == 0 or steps == meta["steps_per_epoch"]):
                elapsed = time.perf_counter() - started
                rate = images_seen * world / max(tick - epoch_start, 1e-9)
                done = global_step - start_epoch * meta["steps_per_epoch"]
                eta = elapsed / max(done, 1) * (total_steps - global_step)
                log.info("epoch %d/%d step %d/%d  loss %.3f (hm %.3f wh %.3f off %.3f)  lr %.2e  %.0f img/s  data %.0f%%  ETA %s",
                         epoch + 1, train.epochs, steps, meta["steps_per_epoch"], terms["total"].item(), terms["heatmap"].item(),
                         terms["size"].item(), terms["offset"].item(), scheduler.get_last_lr()[0], rate,
                         100 * data_wait / max(tick - epoch_start, 1e-9), time.strftime("%M:%S", time.gmtime(eta)))
                tracker.metrics({f"train/{k}": terms[k].item() for k in LOSS_TERMS} | {
                    "train/lr": scheduler.get_last_lr()[0], "train/images_per_s": rate,
                    "train/data_wait_s": data_wait}, step=global_step)

        epoch_time = time.perf_counter() - epoch_start
        metrics: dict[str, Any] = {"epoch": epoch + 1, "images_per_s": images_seen * world / max(epoch_time, 1e-9),
                                   "nonfinite_steps": nonfinite}
        metrics.update({f"loss_{k}": sums[k] / max(steps, 1) for k in LOSS_TERMS})
        last_epoch = epoch + 1 == train.epochs
        kept: list[tuple] = []
        if (epoch + 1) % train.eval_every == 0 or last_epoch:
            detector = Detector(getattr(model, "module", model), config.data.input_size, device,
                                flip_test=train.eval_flip_test, amp=train.amp)
            results, image_ids, kept = detect_shard(detector, shard_batches("val", config, meta["num_classes"],
                                                                            train.batch_size),
                                                    meta["category_ids"], keep_images=8 if last_epoch else 0)
            stats = gather_and_score(results, image_ids, ground_truth)
            if rank == 0:
                log.info("epoch %d evaluation: AP %.4f AP50 %.4f AP75 %.4f (%d images)", epoch + 1, stats["AP"],
                         stats["AP50"], stats["AP75"], stats["eval_images"])
                best_ap = max(best_ap, stats["AP"])
            metrics.update(stats)  # only evaluation epochs carry COCO stats (Tune schedules on these reports)
        metrics["best_AP"] = best_ap
        if tracker is not None:
            metrics["mlflow_run_id"] = tracker.run_id
            tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)

        report_checkpoint = None
        with tempfile.TemporaryDirectory() as directory:
            if ((epoch + 1) % train.checkpoint_every == 0 or last_epoch) and rank == 0:
                state = checkpoint_state(model, config, meta["class_names"], meta["category_ids"], epoch + 1,
                                         optimizer, scheduler, scaler,
                                         {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                state["mlflow_run_id"] = tracker.run_id
                save_checkpoint(Path(directory) / CHECKPOINT_FILE, state)
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
            if rank == 0 and last_epoch:
                tracker.artifact(Path(directory) / CHECKPOINT_FILE, "checkpoint")
                if kept:
                    tracker.artifact(_draw_predictions(kept, meta["class_names"], Path(directory) / "val_predictions.png"))
                if config.tracking.log_model:
                    tracker.model(getattr(model, "module", model).cpu().float().to(memory_format=torch.contiguous_format),
                                  config.data.input_size, config.tracking.registered_model)
            ray.train.report(metrics, checkpoint=report_checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}"
                             if report_checkpoint is not None else None)
    if tracker is not None:
        tracker.close()
