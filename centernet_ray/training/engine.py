"""The training engine (Ray-free): the model, optimizer, schedule, AMP, the optimisation step and
the training epoch.

Every trainer drives a model through this module: the Ray Train worker loop
(``ray_train/loop.py``: shards in, reports and checkpoints out), ``benchmarks/``, and any future
trainer. It imports no Ray (torch; ``torch.distributed`` when a process group is up), so it runs
and is tested on any machine. The evaluation pass is ``centernet_ray.evaluation.evaluate``.

A batch is what the pipeline's collate yields: ``image`` uint8 [B, 3, H_in, W_in] and ``targets``
(``heatmap`` [B, C, H, W], ``index`` [B, M], ``mask`` [B, M], ``size`` and ``offset`` [B, M, 2]), or,
for training on an accelerator, the sparse ``boxes`` [B, M, 4], ``classes`` [B, M] and
``num_boxes`` [B] from which the engine renders those targets on its device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from centernet_ray.config import Config
from centernet_ray.data.transforms import normalize_images
from centernet_ray.detector import Detector
from centernet_ray.losses import CenterNetLoss
from centernet_ray.model import IMAGE_MEAN, IMAGE_STD, build_model
from centernet_ray.precision import autocast_dtype
from centernet_ray.targets import OUTPUT_STRIDE, render_targets
from centernet_ray.training.ema import WeightAverage
from centernet_ray.training.schedule import build_optimizer, build_scheduler, fitted_schedule

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 20
LOSS_TERMS = ("total", "heatmap", "size", "offset")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many consecutive steps: training has diverged."""


@dataclass
class StepResult:
    images: int  # images in the batch
    terms: dict[str, torch.Tensor]  # detached scalar loss terms (LOSS_TERMS), on the device
    finite: torch.Tensor  # bool, on the device; False: the update was skipped (the schedule still advanced)


@dataclass
class Progress:
    """Where an epoch stands, handed to ``train_epoch``'s ``on_progress`` every ``log_every`` steps."""

    epoch: int  # 0-based
    step: int  # updates made in this epoch
    images: int  # images this process trained on in this epoch
    seconds: float  # since the epoch started
    data_wait: float  # seconds of those spent waiting for batches
    global_step: int
    terms: dict[str, torch.Tensor]  # the last step's loss terms
    lr: float


@dataclass
class EpochResult:
    steps: int
    images: int
    seconds: float
    data_wait: float
    mean_terms: dict[str, float] = field(default_factory=dict)  # LOSS_TERMS averaged over the steps


class TrainingEngine:
    """Model, optimizer, LR schedule, gradient scaler and loss of one training process.

    Built as every trainer builds it: the model in channels_last on ``device``, the optimizer and
    schedule from ``config.train``, bf16/fp16 autocast where the device supports it
    (``precision.autocast_dtype``), gradient clipping when ``train.grad_clip`` is set, and an
    EMA of the weights when ``train.ema`` is on (then evaluation and the exported model use it).
    """

    def __init__(self, config: Config, num_classes: int, steps_per_epoch: int,
                 device: str | torch.device = "cpu") -> None:
        self.config = config
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.model: nn.Module = build_model(config.model, num_classes).to(self.device,
                                                                          memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, config.train)
        self.schedule = config.train  # the LR schedule's settings; a time budget refits its length
        self.scheduler = build_scheduler(self.optimizer, lambda: self.schedule, steps_per_epoch)
        self.amp_dtype = autocast_dtype(config.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = CenterNetLoss.from_config(config.loss)
        self.grad_clip = config.train.grad_clip
        train = config.train
        self.ema = WeightAverage(self.model, train.ema_decay, train.ema_tau) if train.ema else None
        self.compiled = self._compile(self.model)
        self.global_step = 0
        # Non-finite steps, counted on the device so that no step waits for it; read at log intervals
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        self._nonfinite, self._consecutive, self._longest_run = zero.clone(), zero.clone(), zero.clone()
        self._reported_nonfinite = 0

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped so far for a non-finite gradient (reads the device: at log intervals only)."""
        return int(self._nonfinite)

    @property
    def consecutive_nonfinite(self) -> int:
        """Skipped steps in a row up to now (reads the device)."""
        return int(self._consecutive)

    def check_finite(self) -> None:
        """Warn about steps skipped since the last check and raise :class:`NonFiniteLossError` once
        ``MAX_CONSECUTIVE_NONFINITE`` were skipped in a row. The step itself decides and counts on
        the device (as ``GradScaler`` does with its found-inf flag); this is where the host looks,
        at the log interval, one read for all."""
        total, longest = (int(v) for v in torch.stack([self._nonfinite, self._longest_run]).tolist())
        if total > self._reported_nonfinite:
            log.warning("%d step(s) with a non-finite gradient skipped (on this or another DDP rank: every rank "
                        "skips the update; %d so far, by step %d)", total - self._reported_nonfinite, total,
                        self.global_step)
            self._reported_nonfinite = total
        if longest >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {longest} consecutive steps: training diverged. "
                "Lower train.lr / train.base_lr, raise train.warmup_epochs, or set train.amp=none.")

    @property
    def module(self) -> nn.Module:
        """The model without its DistributedDataParallel wrapper."""
        return getattr(self.model, "module", self.model)

    @property
    def evaluated_module(self) -> nn.Module:
        """The weights that are evaluated and exported: the EMA when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.module

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the model, e.g. in DDP (``ray.train.torch.prepare_model``); the optimizer keeps
        the same parameters."""
        self.model = wrapper(self.model)
        self.compiled = self._compile(self.model)

    def _compile(self, model: nn.Module) -> Callable | None:
        """``train.compile``: the training forward through ``torch.compile`` (the same parameters;
        evaluation and export use the plain module)."""
        return torch.compile(model) if self.config.train.compile else None

    def fit_schedule(self, epochs: float) -> None:
        """Make the LR schedule end after ``epochs`` epochs (``schedule.fitted_schedule``; 5.6: a time
        budget's short last epoch) from the next step on; the steps taken so far keep their learning rates."""
        self.schedule = fitted_schedule(self.config.train, epochs)

    def load_state(self, state: dict[str, Any], steps_per_epoch: int) -> None:
        """Restore model, optimizer, schedule and scaler from a checkpoint dict (``checkpoint.py``)."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler.is_enabled():  # saved by a run without fp16 (bf16, fp32, a CPU): nothing to restore
            log.info("the checkpoint has no fp16 loss scale: it starts afresh")
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:  # a checkpoint from a run without EMA: start the average from its weights
                self.ema = WeightAverage(self.module, self.config.train.ema_decay, self.config.train.ema_tau)
        self.global_step = state["epoch"] * steps_per_epoch

    def forward_loss(self, batch: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor]]:
        """Normalise the batch's images on the device, run the model under autocast, compute the loss."""
        images = normalize_images(batch["image"].to(self.device, non_blocking=True), IMAGE_MEAN, IMAGE_STD)
        images = images.contiguous(memory_format=torch.channels_last)
        if "targets" in batch:  # rendered by the collate (CPU training)
            targets = {k: v.to(self.device, non_blocking=True) for k, v in batch["targets"].items()}
        else:  # sparse boxes: rendered here, on the device (vectorised on an accelerator)
            height, width = self.config.data.input_size
            settings = self.config.targets
            targets = render_targets(*(batch[k].to(self.device, non_blocking=True)
                                       for k in ("boxes", "classes", "num_boxes")),
                                     self.num_classes, (height // OUTPUT_STRIDE, width // OUTPUT_STRIDE),
                                     settings.max_objects, settings.min_overlap, settings.formula, device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            outputs = (self.model if self.compiled is None else self.compiled)(images)
        return len(images), self.criterion(outputs, targets)

    def step(self, batch: dict[str, Any]) -> StepResult:
        """One optimisation step that never waits for the device. A non-finite gradient skips the
        update, decided on the device (the fused optimizer's ``found_inf``, as ``GradScaler`` passes
        it) and counted there (:meth:`check_finite` reads the counts); the schedule still advances.
        So does a non-finite loss on any DDP process (its flag is all-reduced on the device, where
        NCCL does not stop the host), so that all processes skip together."""
        count, terms = self.forward_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        loss_finite = _finite_everywhere(terms["total"])
        finite = torch.isfinite(norm) & loss_finite
        if self.scaler.is_enabled():  # fp16: GradScaler hands its own found-inf to the fused optimizer
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).to(torch.float32)  # the fused optimizers skip on the device
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        if self.ema is not None:  # on a skipped step the weights did not move: the average stays put
            self.ema.update(self.module)
        # fp16: GradScaler's own overflow skips (while it finds its scale, and after each growth of it)
        # are routine, not divergence: there only a non-finite loss counts
        bad = (~(loss_finite if self.scaler.is_enabled() else finite)).to(torch.int64)
        self._nonfinite += bad
        self._consecutive = (self._consecutive + 1) * bad
        self._longest_run = torch.maximum(self._longest_run, self._consecutive)
        self.scheduler.step()
        self.global_step += 1
        return StepResult(count, {k: v.detach() for k, v in terms.items()}, finite)

    def train_epoch(self, batches: Iterable[dict[str, Any]], epoch: int, *, log_every: int = 20,
                    steps_per_epoch: int | None = None,
                    on_progress: Callable[[Progress], None] | None = None,
                    on_step: Callable[[int], None] | None = None) -> EpochResult:
        """Train on every batch of ``batches``; ``on_progress`` is called every ``log_every``
        steps and at step ``steps_per_epoch`` (the epoch's last), where the non-finite rule is also
        checked; ``on_step`` after every step with the number of steps taken in this epoch. Loss
        terms are summed on the device (over the steps whose loss and gradient were finite) and
        read only there and at the end, averaged over every DDP rank's batches."""
        self.model.train()
        sums = torch.zeros(len(LOSS_TERMS), device=self.device)
        finite_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        images = 0
        data_wait = 0.0
        start = tick = time.perf_counter()
        for taken, batch in enumerate(batches, 1):
            data_wait += time.perf_counter() - tick
            result = self.step(batch)
            tick = time.perf_counter()
            if on_step is not None:
                on_step(taken)
            values = torch.stack([result.terms[key].float() for key in LOSS_TERMS])
            sums += torch.where(result.finite, values, torch.zeros_like(values))  # finite: the total, so every term
            finite_steps += result.finite.to(torch.int64)
            images += result.images
            if on_progress is not None and (taken % log_every == 0 or taken == steps_per_epoch):
                self.check_finite()
                on_progress(Progress(epoch, taken, images, tick - start, data_wait, self.global_step, result.terms,
                                     self.scheduler.get_last_lr()[0]))
        self.check_finite()
        steps = int(finite_steps)
        counted = finite_steps.to(sums.dtype).reshape(1)
        if distributed():  # every rank's batches, not rank 0's share alone: one all-reduce an epoch
            totals = torch.cat([sums, counted])
            dist.all_reduce(totals)
            sums, counted = totals[:-1], totals[-1:]
        means = (sums / counted.clamp(min=1)).tolist()
        return EpochResult(steps, images, time.perf_counter() - start, data_wait, dict(zip(LOSS_TERMS, means)))

    def detector(self) -> Detector:
        """A :class:`Detector` over the current weights, as ``config.train`` evaluates (flip test, amp)."""
        train = self.config.train
        return Detector(self.evaluated_module, self.config.data.input_size, self.device, flip_test=train.eval_flip_test,
                        amp=train.amp)


def distributed() -> bool:
    """Whether a process group of more than one process is up (DDP)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _finite_everywhere(loss: torch.Tensor) -> torch.Tensor:
    """bool tensor on ``loss``'s device: whether ``loss`` is finite here and, under DDP, on every
    other process (an all-reduce of the flag: no read back to the host)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite[0].bool()
