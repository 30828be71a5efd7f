"""train.time_limit: the epochs that fit, the LR schedule fitted to them, the early stop (Ray-free, a
fake clock: the figures below are worked by hand from the constants in ``training/budget.py``)."""

import logging
import math

import pytest

from centernet_ray.config import ConfigError, load_config
from centernet_ray.training import budget as budget_module
from centernet_ray.training.budget import (EVAL_IMAGE_SHARE, EVAL_OVERHEAD_SECONDS, FINISH_SECONDS,
                                          MIN_LAST_EPOCH_SHARE, MIN_REPLAN_SHARE, TimeBudget, eta_seconds)
from centernet_ray.training.engine import TrainingEngine
from centernet_ray.training.schedule import fitted_schedule, lr_factor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(budget_module.time, "time", fake)
    monkeypatch.setattr(budget_module.time, "perf_counter", fake)
    return fake


def _budget(clock, seconds_left, **kwargs):
    settings = dict(max_epochs=100, steps_per_epoch=50, batch_size=16, eval_images=200, eval_every=1000, flip_test=True)
    settings.update(kwargs)
    return TimeBudget(clock.now + seconds_left, **settings)


def _run_steps(budget, clock, count, seconds_per_step, epoch=0):
    plan = None
    for taken in range(1, count + 1):
        clock.now += seconds_per_step
        plan = budget.on_step(taken, epoch) or plan
    return plan


def test_the_plan_fits_whole_epochs_then_part_of_one_after_the_final_evaluation_and_finish(clock):
    budget = _budget(clock, 100.0)
    assert _run_steps(budget, clock, 23, 0.1) is None  # 3 warm-up + 20 timed steps need 24 stamps
    clock.now += 0.1
    plan = budget.on_step(24, 0)
    assert plan is not None and not budget.timing
    # By hand: 0.1 s/step; an epoch 50 x 0.1 = 5 s; an evaluation 5 + 200 x 0.1 / 16 x 0.35 x 2 = 5.875 s;
    # left at the plan 100 - 2.4 = 97.6 s, minus the reserve (5.875 + 25) and the 26 steps left of this
    # epoch (2.6 s) = 64.125 s -> 12 more whole epochs of 5 s, 13 in all, and 4.125 s left: 41 steps of
    # a 14th epoch (at least a quarter of its 50: it is planned), whose evaluation is the final one.
    eval_seconds = EVAL_OVERHEAD_SECONDS + 200 * 0.1 / 16 * EVAL_IMAGE_SHARE * 2
    available = 100.0 - 24 * 0.1 - (eval_seconds + FINISH_SECONDS) - 26 * 0.1
    assert 1 + math.floor(available / 5.0) == 13 and math.floor(available % 5.0 / 0.1) == 41
    assert (plan.epochs, plan.last_epoch_steps) == (14, 41) and plan.length == pytest.approx(13 + 41 / 50)
    assert plan.step_seconds == pytest.approx(0.1) and plan.epoch_seconds == pytest.approx(5.0)
    assert plan.reserve_seconds == pytest.approx(eval_seconds + FINISH_SECONDS)


def test_a_last_epoch_under_a_quarter_is_left_out_and_a_short_one_pays_the_epoch_s_fixed_cost(clock):
    """As above with 91 s: 64.125 - 9 = 55.125 s at the plan, 11 whole epochs and 0.125 s, 1 step,
    under a quarter of 50: 12 epochs, the last whole. With 92.6 s: 56.725 s, 11 whole epochs and
    1.725 s, 17 steps: 13 epochs, the last 17 steps. The epochs' own durations then show a fixed
    cost per epoch beyond its steps, which a short last epoch pays too."""
    short = _run_steps(_budget(clock, 91.0), clock, 24, 0.1)
    assert MIN_LAST_EPOCH_SHARE * 50 > 1 and (short.epochs, short.last_epoch_steps) == (12, 50)
    clock.now = 1000.0
    budget = _budget(clock, 92.6)
    plan = _run_steps(budget, clock, 24, 0.1)
    assert MIN_LAST_EPOCH_SHARE * 50 <= 17 and (plan.epochs, plan.last_epoch_steps) == (13, 17)
    clock.now += 26 * 0.1
    budget.after_epoch(1, next_evaluates=False)
    clock.now += 6.0  # epoch 2: its 50 steps at 0.1 s and 1 s more
    planned = budget.after_epoch(2, next_evaluates=False)
    # By hand: 92.6 - 11 = 81.6 s left; evaluation 5 + 200 x 0.12 / 16 x 0.35 x 2 = 6.05 s, reserve
    # 31.05 s: 50.55 s -> 8 more epochs of 6 s (48 s), 10 in all, and 2.55 s left: an 11th epoch's fixed
    # 1 s and (2.55 - 1) / 0.1 = 15 of its steps (at 0.12 s, the epoch's pace, 21 would not fit)
    assert (planned, budget.plan.last_epoch_steps) == (11, 15)


def test_periodic_evaluations_count_and_max_epochs_caps_the_plan(clock):
    plain = _run_steps(_budget(clock, 100.0), clock, 24, 0.1)
    clock.now = 1000.0
    every_2 = _run_steps(_budget(clock, 100.0, eval_every=2), clock, 24, 0.1)
    # 64.125 s as above, spent on epochs 2, 3, ... alternately costing 5 + 5.875 s (even ones evaluate)
    # and 5 s: after epoch 9, 0.625 s are left, less than epoch 10's 10.875 s
    assert every_2.epochs < plain.epochs and every_2.epochs == 9
    clock.now = 1000.0
    assert _run_steps(_budget(clock, 10_000.0, max_epochs=7), clock, 24, 0.1).epochs == 7


def _train_as_the_loop_does(budget, clock, seconds_per_step, eval_seconds):
    """Epochs in ``ray_train.loop``'s order: the steps (the plan made during them), the decision
    whether the epoch just trained is the last (``_Schedule.ends_after``), then its evaluation
    (periodic, or the final one), set aside; at the end the finish. Returns (epochs, end time)."""
    epochs, last_steps, epoch = budget.max_epochs, budget.steps_per_epoch, 0
    while epoch < epochs:
        steps = last_steps if epoch == epochs - 1 else budget.steps_per_epoch
        for taken in range(1, steps + 1):
            clock.now += seconds_per_step
            plan = budget.on_step(taken, epoch) if budget.timing else None
            if plan is not None:
                epochs, last_steps = plan.epochs, plan.last_epoch_steps
        if epoch + 1 < epochs:
            decided = budget.after_epoch(epoch + 1, (epoch + 2) % budget.eval_every == 0)
            if decided != epochs:
                epochs = decided
                last_steps = budget.plan.last_epoch_steps if budget.plan and decided == budget.plan.epochs else steps
        if (epoch + 1) % budget.eval_every == 0 or epoch + 1 >= epochs:
            clock.now += eval_seconds
            budget.set_aside(eval_seconds)
        epoch += 1
    return epochs, clock.now + FINISH_SECONDS


@pytest.mark.parametrize("eval_every, seconds", [(1, 79.8), (2, 79.8), (2, 120.0), (5, 342.0)])
def test_periodic_evaluations_after_the_decision_still_end_the_run_before_the_deadline(clock, eval_every, seconds):
    """The loop decides whether an epoch is the last before it runs that epoch's periodic evaluation:
    going on must count it. Each evaluation here takes exactly the budget's estimate (5.875 s) and
    the finish ``FINISH_SECONDS``: the run ends by the deadline (it ended up to 5.9 s past it when
    the evaluation of the epoch just trained was left out)."""
    budget = _budget(clock, seconds, eval_every=eval_every)
    eval_seconds = EVAL_OVERHEAD_SECONDS + 200 * 0.1 / 16 * EVAL_IMAGE_SHARE * 2
    epochs, end = _train_as_the_loop_does(budget, clock, 0.1, eval_seconds)
    assert epochs >= 4 and end <= budget.deadline + 1e-9, (epochs, end - budget.deadline)


def test_an_epoch_under_way_that_fits_as_the_last_is_not_warned_about(clock, caplog):
    """eval_every=1: the plan made during epoch 1 stops with it; its evaluation is then the final one,
    in the reserve, not an extra one on top (that read as ~1 s short while 5 s were to spare)."""
    budget = _budget(clock, 40.875, eval_every=1)
    plan = _run_steps(budget, clock, 24, 0.1)
    assert plan.epochs == 1 and "alone needs" not in caplog.text


def test_short_epochs_are_timed_together_and_a_budget_too_small_still_trains_the_epoch_under_way(clock, caplog):
    budget = _budget(clock, 5.0, steps_per_epoch=4)
    assert _run_steps(budget, clock, 4, 0.5, epoch=0) is None  # 4 stamps: not enough yet
    assert budget.after_epoch(1, next_evaluates=False) == 1  # 3 s left: no room for another epoch + reserve
    plan = None
    for epoch in range(1, 6):
        plan = _run_steps(budget, clock, 4, 0.5, epoch=epoch) or plan
    assert plan is not None and plan.epochs == 6  # made during epoch 5 (the 24th step), past the deadline
    assert "alone needs" in caplog.text


def test_epochs_after_the_first_resize_the_plan_and_a_slow_epoch_stops_the_run(clock):
    budget = _budget(clock, 100.0)
    assert _run_steps(budget, clock, 50, 0.1).epochs == 14  # as above
    assert budget.after_epoch(1, next_evaluates=False) == 14  # the first epoch's start-up does not count
    # The second epoch ran at 0.05 s/step (2.5 s) instead of 0.1: re-planned from it with 100 - 7.5 = 92.5 s
    # left: eval 5 + 200 x 0.05 / 16 x 0.35 x 2 = 5.4375 s, reserve 30.4375 s -> 62.0625 s / 2.5 s = 24 more
    # and 2.0625 s for 41 steps of one more
    clock.now += 2.5
    assert budget.after_epoch(2, next_evaluates=False) == 2 + 24 + 1 and budget.plan.last_epoch_steps == 41
    clock.now += 60.0  # then the machine slowed down: an epoch took 60 s
    assert budget.after_epoch(3, next_evaluates=False) == 3  # 32.5 s left < 60 s + the reserve: stop
    assert budget.after_epoch(27, next_evaluates=False) == 27  # the planned end: nothing to decide


def test_a_last_epoch_that_fits_at_the_median_pace_but_not_the_slowest_is_shortened_not_dropped(clock, caplog):
    """The plan is sized at the recent epochs' median pace, the guard at the slowest's: a last epoch
    planned to the second no longer fitted the guard, which stopped the run (the demo on an AVX2
    machine: 104 s of its 585 s unused, AP 0.676). The guard now shortens that epoch to what fits."""
    caplog.set_level(logging.INFO, logger=budget_module.__name__)
    budget = _budget(clock, 60.0)
    assert (_run_steps(budget, clock, 50, 0.1).epochs, budget.after_epoch(1, next_evaluates=False)) == (6, 6)
    clock.now += 7.0  # epoch 2: 7 s; the plan shrinks to 4 whole epochs
    assert budget.after_epoch(2, next_evaluates=False) == 4
    clock.now += 5.0  # epoch 3: 5 s; median 6 s: 5 epochs, the last 49 of 50 steps
    assert budget.after_epoch(3, next_evaluates=False) == 5 and budget.plan.last_epoch_steps == 49
    clock.now += 5.9
    # By hand after epoch 4 (37.1 s left): median 5.9 s (0.1 s a step, 0.9 s fixed), evaluation
    # 5 + 200 x 0.118 / 16 x 0.35 x 2 = 6.0325 s, reserve 31.0325 s: the plan stays 5 epochs, the last
    # 49 steps. The slowest epoch (7 s) is 7 / 5.9 of the median: those 49 steps need
    # (0.9 + 4.9) x 7 / 5.9 + 31.0325 = 37.91 s > 37.1 s. What fits: (37.1 - 31.0325) / (7 / 5.9)
    # = 5.114 s, less the 0.9 s fixed, 42 steps of 0.1 s.
    assert budget.after_epoch(4, next_evaluates=False) == 5 and budget.plan.last_epoch_steps == 42
    assert "the last epoch shortened after epoch 4" in caplog.text and "stopping" not in caplog.text
    slowest_last_epoch = (0.9 + 42 * 0.1) * 7 / 5.9
    assert clock.now + slowest_last_epoch + budget.plan.reserve_seconds <= budget.deadline
    clock.now += 1.0 + 4.2  # the last epoch at the median pace: nothing left to decide
    assert budget.after_epoch(5, next_evaluates=False) == 5


def test_a_shortened_last_epoch_under_a_quarter_of_one_stops_the_run(clock, caplog):
    budget = _budget(clock, 60.0)
    _run_steps(budget, clock, 50, 0.1)
    for epochs_done in (1, 2, 3):  # epochs of 5 s: the plan stays 6 epochs, the last 41 steps
        assert budget.after_epoch(epochs_done, next_evaluates=False) == 6
        clock.now += 5.0
    # By hand after epoch 4 (12 s; 33 s left): median 5 s (0.1 s a step, nothing fixed), reserve
    # 30.875 s: re-planned to 5 epochs, the last 21 steps (2.125 s). At the slowest pace (12 s, 2.4x)
    # they need 5.04 s; 2.125 / 2.4 s hold 8 steps, under a quarter of 50: the run stops.
    clock.now += 7.0
    assert budget.after_epoch(4, next_evaluates=False) == 4
    assert "stopping after epoch 4 (of the 5 planned)" in caplog.text and "shortened" not in caplog.text


def test_short_epochs_whose_start_outweighs_their_steps_end_the_run_at_its_plan(clock):
    """3 steps of 0.1 s but 1.2 s an epoch (each epoch starts the pipeline's iteration again: most of a
    short epoch). The steps alone promise far more epochs than fit; the epochs' own durations correct
    the plan, so the run ends at its plan, its LR schedule fitted to it, not at the guard halfway
    through a schedule sized for twice as many epochs (as a step-timed plan did)."""
    budget = _budget(clock, 120.0, steps_per_epoch=3)
    epochs, plans, epoch = 100, [], 0
    while epoch < epochs:
        for taken in range(1, 4):
            clock.now += 0.1
            plan = budget.on_step(taken, epoch)
            if plan is not None:
                plans.append(epochs := plan.epochs)
        clock.now += 0.9  # the epoch's start and end beyond its steps
        epoch += 1
        decided = budget.after_epoch(epoch, next_evaluates=False)
        if decided != epochs:
            plans.append(epochs := decided)
    # By hand: the plan comes with the 24th step, the last of epoch 8, 8.7 s in; the epochs 2-7 ran at
    # 1.2 s (0.4 s a step), so the reserve is 25 + 5 + 200 x 0.4 / 16 x 0.35 x 2 = 33.5 s and
    # 120 - 8.7 - 33.5 = 77.8 s hold 64 more epochs: 72 in all. (The steps alone, 0.1 s each, said
    # 268 more, capped at the 100 allowed.)
    assert plans[0] == 72 and epoch == plans[-1] == 72, plans
    assert clock.now <= budget.deadline - budget.plan.reserve_seconds + 1e-9


def test_an_epoch_lasts_from_the_last_one_to_this_one_less_its_evaluation(clock):
    """The steps took 5 s, the report and checkpoint after them 1 s more, the evaluation 2 s: the plan is
    sized with 6 s epochs (evaluations are sized apart), not the steps' 5 s nor the 8 s of wall."""
    budget = _budget(clock, 100.0)
    _run_steps(budget, clock, 50, 0.1)
    budget.after_epoch(1, next_evaluates=False)  # the first: only a mark
    clock.now += 2.0
    budget.set_aside(2.0)  # epoch 1's evaluation
    clock.now += 6.0
    planned = budget.after_epoch(2, next_evaluates=False)
    eval_seconds = EVAL_OVERHEAD_SECONDS + 200 * (6.0 / 50) / 16 * EVAL_IMAGE_SHARE * 2
    available = budget.deadline - clock.now - eval_seconds - FINISH_SECONDS
    assert budget.plan.epoch_seconds == pytest.approx(6.0)
    # by hand: 13 s in, evaluations 5 + 200 x 0.12 / 16 x 0.35 x 2 = 6.05 s, 87 - 31.05 = 55.95 s: 9 more
    assert planned == 2 + math.floor(available / 6.0) == 11


@pytest.mark.parametrize("epoch_seconds, kept", [(4.8, True), (4.0, False)])
def test_a_re_plan_by_a_fraction_of_an_epoch_is_noise_and_keeps_the_plan(clock, epoch_seconds, kept):
    budget = _budget(clock, 100.0)
    plan = _run_steps(budget, clock, 50, 0.1)
    assert (plan.epochs, plan.last_epoch_steps) == (14, 41)  # 5 s an epoch, 13.82 epochs long, as above
    budget.after_epoch(1, next_evaluates=False)
    clock.now += epoch_seconds
    # By hand, as above, at epoch_seconds / 50 s a step (the steps' 0.1 s, less: no fixed cost):
    # 4.8 s: 90.2 s left, evaluation 5.84 s, 59.36 s -> 12 more epochs and 1.76 s, 18 steps: 14.36 long;
    # 4.0 s: 91 s left, evaluation 5.7 s, 60.3 s -> 15 more epochs and 0.3 s, 3 steps (too few): 17.
    eval_seconds = EVAL_OVERHEAD_SECONDS + 200 * (epoch_seconds / 50) / 16 * EVAL_IMAGE_SHARE * 2
    available = budget.deadline - clock.now - eval_seconds - FINISH_SECONDS
    whole, steps = math.floor(available / epoch_seconds), math.floor(available % epoch_seconds / (epoch_seconds / 50))
    assert (whole, steps) == {4.8: (12, 18), 4.0: (15, 3)}[epoch_seconds]
    fits = (2 + whole + 1, steps) if steps >= MIN_LAST_EPOCH_SHARE * 50 else (2 + whole, 50)
    # the budget from the plan on: 100 - 2.4 = 97.6 s, 5% of it 4.88 s; 0.54 epoch of 4.8 s (2.6 s)
    # moves the end by less, 3.18 epochs of 4.0 s (12.7 s) by more
    length = fits[0] - 1 + fits[1] / 50
    assert (abs(length - 13.82) * epoch_seconds < MIN_REPLAN_SHARE * 97.6) == kept
    planned = budget.after_epoch(2, next_evaluates=False)
    assert (planned, budget.plan.last_epoch_steps) == ((14, 41) if kept else fits)


def test_a_re_plan_by_one_long_epoch_is_kept(clock):
    """An epoch of 9% of the budget (the 12,000-image demo's) is not noise: with the plan kept one
    such epoch short, 95 s of that demo's 10 minutes went unused."""
    budget = _budget(clock, 600.0, steps_per_epoch=500)
    # By hand: 0.1 s/step, 50 s an epoch, an evaluation 5.875 s as above; at the plan 600 - 2.4 =
    # 597.6 s are left, minus the reserve (30.875 s) and the 476 steps left of this epoch (47.6 s):
    # 519.125 s -> 10 more epochs and 19.125 s for 191 steps of one more: 12 epochs, 11.382 long
    plan = _run_steps(budget, clock, 24, 0.1)
    assert (plan.epochs, plan.last_epoch_steps) == (12, 191)
    clock.now += 476 * 0.1
    assert budget.after_epoch(1, next_evaluates=False) == 12
    clock.now += 45.0  # epoch 2 in 45 s: an evaluation is 5 + 200 x 0.09 / 16 x 0.35 x 2 = 5.7875 s;
    # left 600 - 95 - 30.7875 = 474.2125 s -> 10 more epochs of 45 s after epoch 2 and 24.2125 s for
    # 269 steps of 0.09 s: 13 epochs, 12.538 long, 1.156 epochs of 45 s (52 s) more than 5% of the
    # 597.6 s budget (29.88 s)
    assert budget.after_epoch(2, next_evaluates=False) == 13 and budget.plan.last_epoch_steps == 269


def test_every_rank_decides_alike_and_only_the_announcing_one_logs(clock, caplog):
    """Each DDP process runs a budget (rank 0's decisions are broadcast); only rank 0 says so, instead
    of one line per rank for the plan, the re-plan and the stop."""
    caplog.set_level(logging.INFO, logger=budget_module.__name__)
    decisions, logged = {}, {}
    for announce in (True, False):
        clock.now = 1000.0
        caplog.clear()
        budget = _budget(clock, 100.0, announce=announce)
        planned = _run_steps(budget, clock, 50, 0.1).epochs
        first = budget.after_epoch(1, next_evaluates=False)
        clock.now += 2.5
        replanned = budget.after_epoch(2, next_evaluates=False)
        clock.now += 60.0
        decisions[announce] = (planned, first, replanned, budget.after_epoch(3, next_evaluates=False))
        logged[announce] = caplog.text
    assert decisions[True] == decisions[False] == (14, 14, 27, 3)  # as in the test above
    assert all(what in logged[True] for what in ("-> 14 epoch(s), the last one 41 of 50 steps", "stopping after epoch 3",
                                                 # the plan it had, then the new one (read as "14 -> 27"; it said
                                                 # "27 ... instead of 14, the last one 41", as if the 41 were new)
                                                 "re-planned after epoch 2 (epochs of ~2.5 s): 14 epoch(s), the last "
                                                 "one 41 of 50 steps -> 27 epoch(s)"))
    assert logged[False] == ""


def test_the_progress_eta_is_the_pace_so_far_but_never_past_the_deadline():
    # 1 s per step so far, 100 steps left: 100 s; a deadline 30 s away ends the run first
    assert eta_seconds(10.0, 10, 100) == 100.0
    assert eta_seconds(10.0, 10, 100, to_deadline=30.0) == 30.0
    assert eta_seconds(10.0, 10, 100, to_deadline=500.0) == 100.0
    assert eta_seconds(10.0, 10, 100, to_deadline=-5.0) == 0.0  # past it: finishing now
    assert eta_seconds(3.0, 0, 5) == 15.0 and eta_seconds(3.0, 4, -2) == 0.0


def test_fitted_schedule_moves_step_boundaries_and_ends_the_cosine_at_the_new_length():
    official = load_config(None, ["train.epochs=140", "train.lr_steps=[90,120]", "train.schedule=step"]).train
    assert fitted_schedule(official, 70).lr_steps == (45, 60) and fitted_schedule(official, 70).epochs == 70
    cosine = load_config(None, ["train.epochs=100", "train.schedule=cosine", "train.warmup_epochs=0"]).train
    fitted = fitted_schedule(cosine, 10)
    assert lr_factor(10 * 50, 50, fitted) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5 * 50, 50, fitted) == pytest.approx(0.5)


def test_the_engine_refits_its_schedule_from_the_next_step():
    config = load_config("demo", ["train.epochs=100", "train.warmup_epochs=0"])
    engine = TrainingEngine(config, num_classes=3, steps_per_epoch=10)
    base = engine.optimizer.param_groups[0]["initial_lr"]
    engine.fit_schedule(2)
    for _ in range(10):
        engine.optimizer.step()
        engine.scheduler.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(base * 0.5)  # half-way through 2 epochs
    assert engine.schedule.epochs == 2 and config.train.epochs == 100  # the config itself is unchanged


def test_time_limit_must_be_positive():
    assert load_config(None, ["train.time_limit=600"]).train.time_limit == 600
    with pytest.raises(ConfigError, match="time_limit"):
        load_config(None, ["train.time_limit=0"])


def test_a_run_is_finished_at_its_budget_s_plan_or_else_at_train_epochs():
    """What a rerun of a run reads from its latest checkpoint's metrics: without a time budget it
    trains on to a raised train.epochs; with one, the plan it finished at stands."""
    assert budget_module.run_finished(10, {"epoch": 10}, epochs=10)
    assert not budget_module.run_finished(10, {"epoch": 10}, epochs=12)
    planned = {"epoch": 6, "planned_epochs": 6, "planned_last_epoch_steps": 3}
    assert budget_module.run_finished(6, planned, epochs=500)
    assert not budget_module.run_finished(5, planned, epochs=500)
