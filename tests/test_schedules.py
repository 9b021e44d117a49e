"""DL4J schedules (updaters/schedules.py) against formulas written out here, configs, and argument checks.

Expected values are computed in each test from DL4J's formula (or by hand), never by calling the schedule.
"""

import math

import msgpack
import numpy as np
import pytest

from rayps.updaters import Sgd, from_config as updater_from_config
from rayps.updaters.schedules import (CosineWarmupSchedule, CycleSchedule, ExponentialSchedule, FixedSchedule,
                                      InverseSchedule, MapSchedule, PolySchedule, RampSchedule, SigmoidSchedule,
                                      StepSchedule, from_config)

# (iteration, epoch) pairs with iteration != epoch, so the wrong position would show.
STEPS = [(0, 0), (1, 0), (3, 1), (7, 2), (10, 3), (25, 4), (60, 9)]


def position(schedule_type, iteration, epoch):
    return iteration if schedule_type == "iteration" else epoch


# ---------------------------------------------------------------------------------------------------------
# Values against DL4J's formulas, both schedule types
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_exponential(schedule_type):
    s = ExponentialSchedule(schedule_type, 0.5, 0.9)
    for it, ep in STEPS:
        assert s.value_at(it, ep) == pytest.approx(0.5 * 0.9 ** position(schedule_type, it, ep), rel=1e-12)


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_step(schedule_type):
    s = StepSchedule(schedule_type, 0.1, 0.5, 3)
    for it, ep in STEPS:
        i = position(schedule_type, it, ep)
        assert s.value_at(it, ep) == pytest.approx(0.1 * 0.5 ** (i // 3), rel=1e-12)


def test_step_accepts_a_fractional_step_like_dl4j_double():
    s = StepSchedule("iteration", 1.0, 0.5, 2.5)
    assert [s.value_at(i, 0) for i in (0, 2, 3, 4, 5, 7, 10)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0625]


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_inverse(schedule_type):
    s = InverseSchedule(schedule_type, 0.2, 0.1, 0.75)
    for it, ep in STEPS:
        i = position(schedule_type, it, ep)
        assert s.value_at(it, ep) == pytest.approx(0.2 * (1 + 0.1 * i) ** -0.75, rel=1e-12)


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_poly_follows_the_code_not_the_javadoc(schedule_type):
    # DL4J code: v0 * (1 + i/maxIter)^power (no minus sign), 0 once i >= maxIter.
    s = PolySchedule(schedule_type, 0.1, 2.0, 8)
    for it, ep in STEPS:
        i = position(schedule_type, it, ep)
        expected = 0.1 * (1 + i / 8) ** 2.0 if i < 8 else 0.0
        assert s.value_at(it, ep) == pytest.approx(expected, rel=1e-12)
    assert s.value_at(7, 7) == pytest.approx(0.1 * (15 / 8) ** 2) and s.value_at(7, 7) > 0.1  # grows with power > 0


def test_poly_at_and_after_max_iter():
    s = PolySchedule("iteration", 1.0, -1.5, 10)
    assert s.value_at(0, 0) == 1.0
    assert s.value_at(9, 0) == pytest.approx((1 + 9 / 10) ** -1.5)
    assert s.value_at(10, 0) == 0.0
    assert s.value_at(11, 0) == 0.0 and s.value_at(1000, 0) == 0.0
    assert PolySchedule("epoch", 1.0, -1.5, 10).value_at(1000, 9) == pytest.approx(1.9 ** -1.5)


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_sigmoid(schedule_type):
    s = SigmoidSchedule(schedule_type, 0.3, 0.2, 5)
    for it, ep in STEPS:
        i = position(schedule_type, it, ep)
        assert s.value_at(it, ep) == pytest.approx(0.3 / (1 + math.exp(-0.2 * (i - 5))), rel=1e-12)
    assert SigmoidSchedule(schedule_type, 0.3, 0.2, 5).value_at(5, 5) == pytest.approx(0.15)


@pytest.mark.parametrize("schedule_type", ["iteration", "epoch"])
def test_map_is_piecewise_constant(schedule_type):
    s = MapSchedule(schedule_type, {20: 0.2, 0: 1.0, 10: 0.5})  # key order does not matter
    table = {0: 1.0, 1: 1.0, 9: 1.0, 10: 0.5, 11: 0.5, 19: 0.5, 20: 0.2, 21: 0.2, 10_000: 0.2}
    for i, expected in table.items():
        it, ep = (i, 3) if schedule_type == "iteration" else (3, i)
        assert s.value_at(it, ep) == expected


def test_fixed():
    s = FixedSchedule(0.25)
    assert {s.value_at(it, ep) for it, ep in STEPS} == {0.25}


def test_java_overflow_gives_infinity_or_zero_not_an_exception():
    assert ExponentialSchedule("iteration", 1.0, 10.0).value_at(400, 0) == math.inf  # Math.pow -> Infinity
    assert ExponentialSchedule("iteration", 1.0, -10.0).value_at(401, 0) == -math.inf
    assert SigmoidSchedule("iteration", 1.0, 50.0, 100).value_at(0, 0) == 0.0  # v0 / (1 + Infinity)


# ---------------------------------------------------------------------------------------------------------
# CycleSchedule (1cycle)
# ---------------------------------------------------------------------------------------------------------


def test_cycle_phases_by_hand():
    # initial 0.1, max 1.0, cycle 20, annealing 4, decay 0.5: step_size = 8, increment = 0.9 / 8 = 0.1125
    s = CycleSchedule("iteration", 0.1, 1.0, 20, 4, 0.5)
    by_hand = {
        0: 0.1, 4: 0.1 + 4 * 0.1125, 7: 0.1 + 7 * 0.1125,  # up
        8: 1.0, 12: 1.0 - 4 * 0.1125, 15: 1.0 - 7 * 0.1125,  # down
        16: 0.1, 17: 0.05, 18: 0.025, 19: 0.0125,  # annealing: initial * 0.5^(p - 16)
        20: 0.1, 28: 1.0, 36: 0.1, 39: 0.0125,  # the next cycle repeats
    }
    for p, expected in by_hand.items():
        assert s.value_at(p, 0) == pytest.approx(expected, rel=1e-12), p
    assert (s.step_size, s.increment) == (8, pytest.approx(0.1125))


def test_cycle_epoch_type_uses_the_epoch():
    s = CycleSchedule("epoch", 0.1, 1.0, 20, 4, 0.5)
    assert s.value_at(999, 8) == 1.0
    assert s.value_at(8, 17) == pytest.approx(0.05)


@pytest.mark.parametrize("cycle_length, annealing_length", [(5, 1), (25, 3), (100, 10), (101, 10), (3, 0)])
def test_cycle_short_form(cycle_length, annealing_length):
    # DL4J: initial = max * 0.1, annealing = Math.round(cycle * 0.1) (halves up: 0.5 -> 1, 2.5 -> 3), decay 0.1
    s = CycleSchedule.from_max_learning_rate("iteration", 2.0, cycle_length)
    assert s == CycleSchedule("iteration", 2.0 * 0.1, 2.0, cycle_length, annealing_length, 0.1)
    assert s.value_at(0, 0) == pytest.approx(0.2)
    assert s.value_at((cycle_length - annealing_length) // 2, 0) == 2.0


def test_cycle_odd_gap_reproduces_dl4j_position_before_annealing():
    # cycle 101, annealing 10: step_size 45, so position 90 is in neither ramp and DL4J's annealing
    # exponent there is 10 - (101 - 90) = -1: initial / decay.
    s = CycleSchedule.from_max_learning_rate("iteration", 1.0, 101)
    assert s.value_at(89, 0) == pytest.approx(1.0 - 44 * 0.9 / 45)
    assert s.value_at(90, 0) == pytest.approx(0.1 / 0.1)
    assert s.value_at(91, 0) == pytest.approx(0.1)
    assert s.value_at(100, 0) == pytest.approx(0.1 * 0.1 ** 9)


# ---------------------------------------------------------------------------------------------------------
# RampSchedule and CosineWarmupSchedule
# ---------------------------------------------------------------------------------------------------------


def test_ramp_before_and_after_num_iter():
    s = RampSchedule(ExponentialSchedule("iteration", 0.2, 0.9), 5)
    for i in range(12):
        base = 0.2 * 0.9 ** i
        expected = (i + 1) / 5 * base if i < 5 else base
        assert s.value_at(i, 0) == pytest.approx(expected, rel=1e-12), i
    assert s.value_at(4, 0) == pytest.approx(0.2 * 0.9 ** 4)  # (4 + 1) / 5 = 1 at num_iter - 1


def test_ramp_counts_iterations_even_over_an_epoch_schedule():
    s = RampSchedule(StepSchedule("epoch", 1.0, 0.5, 1), 10)
    assert s.value_at(1, 3) == pytest.approx(2 / 10 * 0.125)
    assert s.value_at(50, 0) == 1.0
    assert RampSchedule(FixedSchedule(0.3), 1).value_at(0, 0) == 0.3


def test_cosine_warmup_and_decay():
    s = CosineWarmupSchedule(1e-3, 1e-5, 10, 110)
    for i in range(10):  # linear from 0, not from min_lr
        assert s.value_at(i, 0) == pytest.approx(1e-3 * i / 10, rel=1e-12, abs=0)
    assert s.value_at(10, 0) == pytest.approx(1e-3)
    for i in (10, 35, 60, 85, 109):
        progress = (i - 10) / 100
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * progress)) / 2
        assert s.value_at(i, 0) == pytest.approx(expected, rel=1e-12)
    assert s.value_at(60, 0) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s.value_at(110, 0) == 1e-5 and s.value_at(5000, 0) == 1e-5
    assert s.value_at(5, 99) == s.value_at(5, 0)  # iterations only


def test_cosine_warmup_edges_and_from_ratio():
    no_warmup = CosineWarmupSchedule(0.1, 0.0, 0, 4)
    assert [no_warmup.value_at(i, 0) for i in range(5)] == pytest.approx(
        [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    assert CosineWarmupSchedule(0.1, 0.01, 3, 3).value_at(3, 0) == 0.01  # total == warmup: no division by 0
    assert CosineWarmupSchedule.from_ratio(0.1, 0.0, 0.15, 10) == CosineWarmupSchedule(0.1, 0.0, 1, 10)  # (int) 1.5
    assert CosineWarmupSchedule.from_ratio(0.1, 0.0, 0.1, 1000).warmup_steps == 100


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

ALL_SCHEDULES = [
    FixedSchedule(0.01),
    ExponentialSchedule("epoch", 0.1, 0.95),
    StepSchedule("iteration", 0.1, 0.5, 3),
    InverseSchedule("epoch", 0.1, 0.01, 0.5),
    PolySchedule("iteration", 0.1, -2.0, 50),
    SigmoidSchedule("epoch", 0.1, 0.3, 4),
    MapSchedule("iteration", {0: 0.1, 5: 0.05, 12: 0.01}),
    CycleSchedule("iteration", 0.01, 0.1, 30, 6, 0.3),
    CycleSchedule.from_max_learning_rate("epoch", 0.1, 25),
    RampSchedule(RampSchedule(MapSchedule("epoch", {0: 1.0, 2: 0.5}), 3), 7),
    CosineWarmupSchedule(0.1, 0.001, 5, 40),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_config_round_trip_through_msgpack(schedule):
    config = schedule.to_config()
    restored = from_config(msgpack.unpackb(msgpack.packb(config)))
    assert restored == schedule and type(restored) is type(schedule)
    assert restored.to_config() == config
    for it, ep in STEPS + [(44, 13)]:
        assert restored.value_at(it, ep) == schedule.value_at(it, ep)


def test_config_layouts():
    ramp = RampSchedule(StepSchedule("epoch", 0.1, 0.5, 2), 4).to_config()
    assert ramp["base_schedule"] == {"type": "StepSchedule", "version": 1, "schedule_type": "epoch",
                                     "initial_value": 0.1, "decay_rate": 0.5, "step": 2.0}
    assert MapSchedule("iteration", {0: 1, 10: 0.5}).to_config()["values"] == {"0": 1.0, "10": 0.5}
    assert set(CycleSchedule("iteration", 0.1, 1.0, 20, 4, 0.5).to_config()) == {
        "type", "version", "schedule_type", "initial_learning_rate", "max_learning_rate", "cycle_length",
        "annealing_length", "annealing_decay"}
    assert set(CosineWarmupSchedule(0.1, 0.0, 1, 2).to_config()) == {
        "type", "version", "max_lr", "min_lr", "warmup_steps", "total_steps"}


# ---------------------------------------------------------------------------------------------------------
# Argument checks: each message names the class and the field
# ---------------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (lambda: StepSchedule("iteration", 0.1, 0.5, 0), ValueError, r"StepSchedule: step must be > 0, got 0"),
    (lambda: StepSchedule("iteration", 0.1, 0.5, -1.5), ValueError, r"StepSchedule: step must be > 0"),
    (lambda: StepSchedule("iteration", 0.1, math.nan, 2), ValueError, r"StepSchedule: decay_rate must be finite"),
    (lambda: StepSchedule("batch", 0.1, 0.5, 2), ValueError,
     r"StepSchedule: schedule_type must be one of \('iteration', 'epoch'\), got 'batch'"),
    (lambda: ExponentialSchedule("ITERATION", 0.1, 0.5), ValueError, r"ExponentialSchedule: schedule_type"),
    (lambda: ExponentialSchedule(None, 0.1, 0.5), ValueError, r"ExponentialSchedule: schedule_type"),
    (lambda: ExponentialSchedule("epoch", math.inf, 0.5), ValueError, r"ExponentialSchedule: initial_value must "
                                                                       r"be finite"),
    (lambda: ExponentialSchedule("epoch", "0.1", 0.5), TypeError, r"ExponentialSchedule: initial_value must be a "
                                                                   r"real number"),
    (lambda: ExponentialSchedule("epoch", 0.1, True), TypeError, r"ExponentialSchedule: gamma must be a real"),
    (lambda: InverseSchedule("epoch", 0.1, -0.1, 1.0), ValueError, r"InverseSchedule: gamma must be >= 0"),
    (lambda: InverseSchedule("epoch", 0.1, 0.1, math.nan), ValueError, r"InverseSchedule: power must be finite"),
    (lambda: PolySchedule("epoch", 0.1, 2.0, 0), ValueError, r"PolySchedule: max_iter must be >= 1, got 0"),
    (lambda: PolySchedule("epoch", 0.1, 2.0, 10.0), TypeError, r"PolySchedule: max_iter must be an integer"),
    (lambda: PolySchedule("epoch", 0.1, -math.inf, 10), ValueError, r"PolySchedule: power must be finite"),
    (lambda: SigmoidSchedule("epoch", 0.1, 0.5, -1), ValueError, r"SigmoidSchedule: step_size must be >= 0"),
    (lambda: SigmoidSchedule("epoch", 0.1, 0.5, 2.5), TypeError, r"SigmoidSchedule: step_size must be an integer"),
    (lambda: MapSchedule("epoch", {1: 0.1, 5: 0.01}), ValueError, r"MapSchedule: values must contain key 0"),
    (lambda: MapSchedule("epoch", {}), ValueError, r"MapSchedule: values must contain key 0"),
    (lambda: MapSchedule("epoch", [(0, 0.1)]), TypeError, r"MapSchedule: values must be a dict"),
    (lambda: MapSchedule("epoch", {0: 0.1, -3: 0.2}), ValueError, r"MapSchedule: values key -3 must be >= 0"),
    (lambda: MapSchedule("epoch", {0: 0.1, 1.5: 0.2}), TypeError, r"MapSchedule: values key 1.5 must be an int"),
    (lambda: MapSchedule("epoch", {0: 0.1, "x": 0.2}), ValueError, r"MapSchedule: values keys must be integers"),
    (lambda: MapSchedule("epoch", {0: 0.1, "0": 0.2}), ValueError, r"MapSchedule: values key '0' repeats"),
    (lambda: MapSchedule("epoch", {0: 0.1, 4: math.nan}), ValueError, r"MapSchedule: values\[4\] must be finite"),
    (lambda: MapSchedule("epoch", {0: None}), TypeError, r"MapSchedule: values\[0\] must be a real number"),
    (lambda: CycleSchedule("epoch", 0.2, 0.1, 20, 4, 0.5), ValueError,
     r"CycleSchedule: initial_learning_rate must be <= max_learning_rate"),
    (lambda: CycleSchedule("epoch", 0.01, 0.1, 0, 0, 0.5), ValueError, r"CycleSchedule: cycle_length must be >= 1"),
    (lambda: CycleSchedule("epoch", 0.01, 0.1, 20, -1, 0.5), ValueError,
     r"CycleSchedule: annealing_length must be >= 0"),
    (lambda: CycleSchedule("epoch", 0.01, 0.1, 20, 19, 0.5), ValueError,
     r"CycleSchedule: annealing_length must be <= cycle_length - 2"),
    (lambda: CycleSchedule("epoch", 0.01, 0.1, 20, 4, 0.0), ValueError, r"CycleSchedule: annealing_decay must be > 0"),
    (lambda: CycleSchedule("epoch", 0.01, math.nan, 20, 4, 0.5), ValueError,
     r"CycleSchedule: max_learning_rate must be finite"),
    (lambda: CycleSchedule.from_max_learning_rate("epoch", 0.1, 1), ValueError, r"CycleSchedule: annealing_length"),
    (lambda: CycleSchedule.from_max_learning_rate("epoch", 0.1, 20.0), TypeError,
     r"CycleSchedule: cycle_length must be an integer"),
    (lambda: RampSchedule(0.1, 10), TypeError, r"RampSchedule: base_schedule must be a Schedule"),
    (lambda: RampSchedule(FixedSchedule(0.1), 0), ValueError, r"RampSchedule: num_iter must be >= 1, got 0"),
    (lambda: RampSchedule({"type": "Nope"}, 3), ValueError, r"schedule config: unknown type 'Nope'"),
    (lambda: FixedSchedule(math.nan), ValueError, r"FixedSchedule: value must be finite"),
    (lambda: CosineWarmupSchedule(0.1, 0.0, -1, 10), ValueError, r"CosineWarmupSchedule: warmup_steps must be >= 0"),
    (lambda: CosineWarmupSchedule(0.1, 0.0, 20, 10), ValueError,
     r"CosineWarmupSchedule: total_steps must be >= warmup_steps \(20\), got 10"),
    (lambda: CosineWarmupSchedule(math.inf, 0.0, 1, 10), ValueError, r"CosineWarmupSchedule: max_lr must be finite"),
    (lambda: CosineWarmupSchedule(0.1, "0", 1, 10), TypeError, r"CosineWarmupSchedule: min_lr must be a real"),
    (lambda: CosineWarmupSchedule.from_ratio(0.1, 0.0, 1.5, 10), ValueError,
     r"CosineWarmupSchedule: warmup_ratio must be in \[0, 1\]"),
]


@pytest.mark.parametrize("make, error, message", BAD_ARGUMENTS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_name_the_class_and_field(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_from_config_rejects_unknown_fields():
    config = StepSchedule("epoch", 0.1, 0.5, 2).to_config()
    config["gama"] = 1
    with pytest.raises(ValueError, match=r"schedule config for StepSchedule: unknown field\(s\) \['gama'\]"):
        from_config(config)


# ---------------------------------------------------------------------------------------------------------
# A schedule as an updater's learning rate
# ---------------------------------------------------------------------------------------------------------


def test_sgd_learning_rate_schedule_changes_the_step():
    sgd = Sgd(learning_rate=StepSchedule("iteration", 0.1, 0.5, 2))
    params = np.array([1.0, -2.0, 3.0])
    grads = np.array([0.5, 0.25, -1.0])
    state = sgd.init(params)
    expected = params.copy()
    for iteration in range(6):
        sgd.apply(params, grads, state, iteration, kernel="reference")
        expected -= (0.1 * 0.5 ** (iteration // 2)) * grads  # lr 0.1, 0.1, 0.05, 0.05, 0.025, 0.025
        np.testing.assert_allclose(params, expected, rtol=1e-14)


def test_sgd_epoch_schedule_uses_the_epoch_passed_to_apply():
    sgd = Sgd(learning_rate=MapSchedule("epoch", {0: 0.1, 1: 0.01}))
    params, grads = np.ones(3), np.full(3, 2.0)
    state = sgd.init(params)
    sgd.apply(params, grads, state, 7, epoch=0, kernel="reference")
    np.testing.assert_allclose(params, 1.0 - 0.1 * 2.0)
    sgd.apply(params, grads, state, 8, epoch=1, kernel="reference")
    np.testing.assert_allclose(params, 1.0 - 0.1 * 2.0 - 0.01 * 2.0)


@pytest.mark.parametrize("schedule", [StepSchedule("iteration", 0.1, 0.5, 2),
                                      RampSchedule(CycleSchedule.from_max_learning_rate("iteration", 0.1, 20), 5),
                                      MapSchedule("epoch", {0: 0.1, 3: 0.01})], ids=lambda s: type(s).__name__)
def test_sgd_config_with_schedule_round_trips(schedule):
    sgd = Sgd(learning_rate=schedule)
    config = msgpack.unpackb(msgpack.packb(sgd.to_config()))
    restored = updater_from_config(config)
    assert restored == sgd and restored.learning_rate == schedule
    assert [restored.learning_rate_at(i, i // 4) for i in range(12)] == [sgd.learning_rate_at(i, i // 4)
                                                                         for i in range(12)]
