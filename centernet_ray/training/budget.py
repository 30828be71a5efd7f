"""A wall-clock budget for training (``train.time_limit``), Ray-free.

The budget ends at a ``deadline`` (seconds since the epoch, ``time.time()``). During the first
epoch trained, :class:`TimeBudget` times the steps after a short warm-up and decides how many
epochs fit before the deadline once the final evaluation, checkpoint and shutdown are set aside:
the whole epochs that fit, then the steps of one more, shorter epoch in what is left (when that is
at least ``MIN_LAST_EPOCH_SHARE`` of an epoch); the trainer fits its LR schedule to exactly those
steps (``TrainingEngine.fit_schedule``), so a fast machine trains longer, a slow one still finishes
its schedule, and neither leaves most of an epoch's time unused. After every epoch the plan
is re-sized from the median duration of the recent epochs: an epoch costs more than its steps
(each one starts the data pipeline's iteration again), which for short epochs is most of it, and
the first epoch is left out (its steps also wait for the workers and the pipeline to start). Each
epoch also checks that the next one still fits at the pace of the slowest recent epoch; if not, the
next one becomes the last, shortened to the steps that fit (at least ``MIN_LAST_EPOCH_SHARE`` of an
epoch), or the run ends with the epoch just trained.

Under DDP every process must take the same decisions (they train in lockstep): rank 0's are
broadcast to all.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from centernet_ray.training.engine import distributed

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # not timed: the first steps include the pipeline's and the allocator's start-up
TIMED_STEPS = 20
RECENT_EPOCHS = 5  # the epochs whose durations size the plan (median) and the guard (slowest)
# A re-plan moves the end of training by at least this share of the budget (the seconds from the
# first plan to the deadline), or it is left out: a move shorter than that is the noise of the epochs'
# durations (the 4,000-image demo's plan went 36, 37, 36, 35, 36, 35, 36, 37 with epochs of 2% of
# its budget), and every change refits the LR schedule. An epoch of the 12,000-image demo is 9% of
# its budget: ignoring a one-epoch move (the rule was "at least 2 epochs") left 95 s of its 10
# minutes unused. The guard still stops a run whose last planned epoch no longer fits.
MIN_REPLAN_SHARE = 0.05
# Set aside after the last epoch besides the evaluation itself: the checkpoint, the MLflow run's
# figures and model, Ray Train's shutdown and the driver's summary. Measured on the demo: ~12 s on a
# 2-core AVX512-BF16 machine (the model's MLflow logging is most of it); doubled as the margin.
FINISH_SECONDS = 25.0
# An evaluation image costs about this share of a training image (forward only, no loss or
# backward, measured on the demo model: 0.31), doubled with the flip test; plus the pipeline's
# start and COCOeval.
EVAL_IMAGE_SHARE = 0.35
EVAL_OVERHEAD_SECONDS = 5.0
# The shortest last epoch planned, as a share of an epoch: a shorter one would add little training,
# and an epoch's fixed cost (its pipeline iteration starting) is a larger part of it than the pace
# (the median epoch over its steps) charges. The slower demo VM left 82 s of its 10 minutes unused,
# most of a 77 s epoch, when only whole epochs were planned.
MIN_LAST_EPOCH_SHARE = 0.25


@dataclass
class BudgetPlan:
    epochs: int  # epochs in all, counted from the run's first (earlier attempts included), the last maybe short
    step_seconds: float  # median wall time of a step, waiting for data included
    epoch_seconds: float
    eval_seconds: float  # one evaluation pass
    reserve_seconds: float  # kept for the final evaluation and the finish
    last_epoch_steps: int  # steps of the last epoch: an epoch's steps, or fewer when only part of one fits
    steps_per_epoch: int

    @property
    def length(self) -> float:
        """The run's length in epochs, the last one counted by its share of an epoch (5.6: five
        whole epochs and 60% of a sixth): what the LR schedule is fitted to."""
        return self.epochs - 1 + self.last_epoch_steps / self.steps_per_epoch


class TimeBudget:
    """Sizes and guards a run against ``deadline``.

    ``max_epochs``: the most epochs to plan (``train.epochs``); ``eval_images``: validation images
    this process evaluates; ``eval_every`` and ``flip_test`` as in ``train``; ``announce``: whether
    this process logs the plan and its changes (rank 0: all processes decide alike).
    """

    def __init__(self, deadline: float, *, max_epochs: int, steps_per_epoch: int, batch_size: int,
                 eval_images: int, eval_every: int, flip_test: bool, announce: bool = True) -> None:
        self.deadline = deadline
        self.announce = announce
        self.max_epochs, self.steps_per_epoch, self.batch_size = max_epochs, steps_per_epoch, batch_size
        self.eval_images, self.eval_every, self.flip_test = eval_images, eval_every, flip_test
        self.plan: BudgetPlan | None = None
        self._span = 0.0  # seconds from the first plan to the deadline
        self._stamps: list[float] = []
        self._epoch_seconds: list[float] = []  # of the epochs after the first this process trained
        self._epoch_mark: float | None = None  # time.perf_counter() at the last after_epoch
        self._set_aside = 0.0  # seconds since then spent on evaluations (sized apart, per evaluation)

    def _say(self, level: int, message: str, *args: object) -> None:
        if self.announce:
            log.log(level, message, *args)

    @property
    def timing(self) -> bool:
        """Whether steps are still being timed (no plan yet)."""
        return self.plan is None

    def on_step(self, taken: int, epoch: int) -> BudgetPlan | None:
        """Call after each step (``taken`` steps so far in epoch ``epoch``, 0-based); returns the plan
        once it is made: after ``WARMUP_STEPS + TIMED_STEPS`` steps, however many epochs they span
        (an epoch's start, included once per epoch, hardly moves the median)."""
        if self.plan is not None:
            return None
        self._stamps.append(time.perf_counter())
        if len(self._stamps) <= WARMUP_STEPS + TIMED_STEPS:
            return None
        self.plan = _agreed(self._size(self._pace(), epoch, in_epoch_steps_left=self.steps_per_epoch - taken))
        self._span = self.deadline - time.time()
        self._say(logging.INFO, "time budget: %.0f s left, %.2f s/step, epochs of ~%.0f s -> %s; %.0f s kept for the "
                  "final evaluation and checkpoint", self._span, self.plan.step_seconds, self.plan.epoch_seconds,
                  describe(self.plan), self.plan.reserve_seconds)
        return self.plan

    def _step_seconds(self) -> float:
        intervals = [b - a for a, b in zip(self._stamps, self._stamps[1:])]
        return statistics.median(intervals[WARMUP_STEPS:] or intervals or [0.0])

    def _pace(self) -> float:
        """Seconds per step: from the recent epochs' median duration once one (after the first) is
        known, which counts each epoch's start; else the timed steps' median."""
        if self._epoch_seconds:
            return statistics.median(self._epoch_seconds[-RECENT_EPOCHS:]) / self.steps_per_epoch
        return self._step_seconds()

    def _split(self, step: float) -> tuple[float, float]:
        """(seconds of a step, fixed seconds of an epoch) in an epoch of ``step`` seconds per step:
        what the timed steps took, and the rest of the epoch's duration (its pipeline iteration
        starting, the report), which a short epoch also pays."""
        step_alone = min(self._step_seconds() or step, step)
        return step_alone, (step - step_alone) * self.steps_per_epoch

    def _size(self, step: float, epoch: int, in_epoch_steps_left: int | None = None) -> BudgetPlan:
        """The plan at ``step`` seconds per step after epoch ``epoch`` (0-based), which is finished in
        any case: ``in_epoch_steps_left`` of its steps and its fixed cost are still to come when
        sized during it, nothing when sized after it; and its periodic evaluation, when it has one
        (the trainer runs it after this decision), unless the plan stops with it (then it is the
        final one, in the reserve)."""
        epoch_seconds = step * self.steps_per_epoch
        eval_seconds = (EVAL_OVERHEAD_SECONDS + self.eval_images * step / self.batch_size * EVAL_IMAGE_SHARE
                        * (2 if self.flip_test else 1))
        reserve = eval_seconds + FINISH_SECONDS
        step_alone, fixed = self._split(step)
        epoch_rest = 0.0 if in_epoch_steps_left is None else in_epoch_steps_left * step_alone + fixed
        current_eval = eval_seconds if (epoch + 1) % self.eval_every == 0 else 0.0
        available = self.deadline - time.time() - reserve - epoch_rest - current_eval
        epochs = epoch + 1  # the current one is finished in any case
        last_steps = self.steps_per_epoch
        while epochs < self.max_epochs:  # add epoch number epochs + 1 (1-based) while it fits
            cost = epoch_seconds + (eval_seconds if (epochs + 1) % self.eval_every == 0 else 0.0)
            if cost > available:
                break
            available -= cost
            epochs += 1
        if available + current_eval < 0:  # stopping with it, its evaluation is the final one
            self._say(logging.WARNING, "time budget: the epoch under way alone needs ~%.0f s more than "
                      "train.time_limit leaves", -(available + current_eval))
        elif available > 0 and epochs < self.max_epochs and step > 0:
            # part of one more epoch: its evaluation is the final one, already in the reserve
            steps = self._short_epoch_steps(available, step_alone, fixed, self.steps_per_epoch)
            if steps:
                epochs, last_steps = epochs + 1, steps
        return BudgetPlan(epochs, step, epoch_seconds, eval_seconds, reserve, last_steps, self.steps_per_epoch)

    def _short_epoch_steps(self, seconds: float, step_alone: float, fixed: float, at_most: int) -> int:
        """The steps (at most ``at_most``) of a last epoch that fit in ``seconds``, its fixed cost paid;
        0 when they are fewer than ``MIN_LAST_EPOCH_SHARE`` of an epoch."""
        if step_alone <= 0:
            return 0
        steps = min(int((seconds - fixed) / step_alone), at_most)
        return steps if steps >= max(1, math.ceil(MIN_LAST_EPOCH_SHARE * self.steps_per_epoch)) else 0

    def set_aside(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the epoch under way's duration."""
        self._set_aside += seconds

    def after_epoch(self, epochs_done: int, next_evaluates: bool) -> int:
        """After an epoch: the epochs the run now trains in all (``epochs_done``: stop now). An epoch
        lasts from the previous call to this one, less what :meth:`set_aside` was told (evaluations):
        the reports, metrics and checkpoints between the epochs' steps are part of its cost. Once
        there is a plan, every epoch re-sizes it from the median of the recent epochs this process
        trained after its first (whose steps also waited for the pipeline to start), unless that
        moves the end by less than ``MIN_REPLAN_SHARE`` of the budget; every epoch checks that the
        next one (with its evaluation when ``next_evaluates``; only its steps when it is the planned
        last, whose evaluation is the final one) and the final evaluation still end before the
        deadline, at the pace of the slowest recent epoch; when it does not, a shorter next epoch (then
        the last) that does is planned instead of stopping. The same answer on every DDP process;
        the steps of the last epoch are ``plan.last_epoch_steps``."""
        if self.plan is not None and epochs_done >= self.plan.epochs:
            return epochs_done
        now = time.perf_counter()
        if self._epoch_mark is not None:  # not after the first: it also started the pipeline and the workers
            self._epoch_seconds.append(now - self._epoch_mark - self._set_aside)
        self._epoch_mark, self._set_aside = now, 0.0
        if self.plan is not None and self._epoch_seconds:
            before = self.plan
            plan = self._size(self._pace(), epochs_done - 1)
            if abs(plan.length - before.length) * plan.epoch_seconds < MIN_REPLAN_SHARE * self._span:
                plan = replace(plan, epochs=before.epochs, last_epoch_steps=before.last_epoch_steps)
            self.plan = _agreed(plan)  # rank 0's decision: the spans of the processes differ by their start
            if (self.plan.epochs, self.plan.last_epoch_steps) != (before.epochs, before.last_epoch_steps):
                self._say(logging.INFO, "time budget: re-planned after epoch %d (epochs of ~%.1f s): %s -> %s",
                          epochs_done, self.plan.epoch_seconds, describe(before), describe(self.plan))
        slowest = max(self._epoch_seconds[-RECENT_EPOCHS:], default=0.0)
        estimate = self.plan or self._size(self._pace(), epochs_done - 1)
        # going on means the evaluation of the epoch just trained, when it has one (it runs after
        # this decision; were the run to stop, it would be the final one, in the reserve)
        this_evaluation = estimate.eval_seconds if epochs_done % self.eval_every == 0 else 0.0
        next_steps, next_evaluation = self.steps_per_epoch, estimate.eval_seconds if next_evaluates else 0.0
        if self.plan is not None and epochs_done + 1 == self.plan.epochs:  # the next is the last: its
            next_steps, next_evaluation = self.plan.last_epoch_steps, 0.0  # evaluation is the reserved one
        step_alone, fixed = self._split(estimate.step_seconds)
        slowdown = max(slowest / estimate.epoch_seconds, 1.0) if estimate.epoch_seconds > 0 else 1.0
        needed = ((fixed + next_steps * step_alone) * slowdown + estimate.reserve_seconds + this_evaluation
                  + next_evaluation)
        if not _agreed_flag(time.time() + needed > self.deadline):
            return self.plan.epochs if self.plan is not None else self.max_epochs
        if self.plan is not None and self.plan.epochs > epochs_done:  # a shorter next one, the last, may fit
            left = self.deadline - time.time() - estimate.reserve_seconds - this_evaluation
            fitting = int(_from_rank0([self._short_epoch_steps(left / slowdown, step_alone, fixed, next_steps)])[0])
            if fitting:
                before, self.plan = self.plan, replace(self.plan, epochs=epochs_done + 1, last_epoch_steps=fitting)
                self._say(logging.INFO, "time budget: the last epoch shortened after epoch %d, to end before the "
                          "deadline at the pace of the slowest recent epoch (~%.1f s): %s -> %s", epochs_done, slowest,
                          describe(before), describe(self.plan))
                return self.plan.epochs
        self._say(logging.WARNING, "time budget: stopping after epoch %d (%s): another epoch and the final "
                  "evaluation need ~%.0f s, %.0f s are left", epochs_done,
                  f"of the {self.plan.epochs} planned" if self.plan else "before the plan was made",
                  needed, self.deadline - time.time())
        return epochs_done


def resumed_plan(metrics: dict[str, float]) -> tuple[int, int] | None:
    """(epochs, steps of the last one) that the attempt which wrote a checkpoint's ``metrics`` had
    planned, or None without a plan: a restarted attempt trains to it, its LR schedule fitted to it
    from the first step, until its own timing re-plans."""
    if "planned_last_epoch_steps" not in metrics:  # written only under a time budget
        return None
    return int(metrics["planned_epochs"]), int(metrics["planned_last_epoch_steps"])


def run_finished(epochs_done: int, metrics: dict[str, float], epochs: int) -> bool:
    """Whether a run whose latest checkpoint (after ``epochs_done`` epochs) reported ``metrics`` has
    nothing left to train with ``train.epochs`` = ``epochs``: it finished at its time budget's plan,
    or at train.epochs (raised, the run trains on). A rerun of it is reported, not retrained."""
    planned = resumed_plan(metrics)
    return epochs_done >= (planned[0] if planned else epochs)


def describe(plan: BudgetPlan) -> str:
    """``"6 epoch(s)"``, or ``"6 epoch(s), the last one 14 of 20 steps"`` when the last one is short."""
    if plan.last_epoch_steps >= plan.steps_per_epoch:
        return f"{plan.epochs} epoch(s)"
    return f"{plan.epochs} epoch(s), the last one {plan.last_epoch_steps} of {plan.steps_per_epoch} steps"


def eta_seconds(elapsed: float, steps_done: int, steps_left: int, to_deadline: float | None = None) -> float:
    """Seconds left at the pace of the ``steps_done`` steps so far (``elapsed`` seconds), never past a
    time budget's deadline (``to_deadline`` seconds away), by which the run ends: the first epoch's
    pace includes the pipeline's start and, before the plan, the epochs are ``train.epochs``."""
    eta = elapsed / max(steps_done, 1) * max(steps_left, 0)
    return eta if to_deadline is None else min(eta, max(to_deadline, 0.0))


def _agreed(plan: BudgetPlan) -> BudgetPlan:
    """Rank 0's plan on every process of a DDP group (the plan as it is without one)."""
    values = _from_rank0([plan.epochs, plan.step_seconds, plan.epoch_seconds, plan.eval_seconds, plan.reserve_seconds,
                          plan.last_epoch_steps])
    return BudgetPlan(int(round(values[0])), *values[1:5], int(round(values[5])), plan.steps_per_epoch)


def _agreed_flag(flag: bool) -> bool:
    return _from_rank0([1.0 if flag else 0.0])[0] > 0.5


def _from_rank0(values: list[float]) -> list[float]:
    if not distributed():
        return values
    # NCCL only moves GPU tensors; gloo, CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
