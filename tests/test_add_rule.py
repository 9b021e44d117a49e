"""Adding an update rule, step by step as docs/design.md ("Adding an update rule") writes them, with a toy rule.

The toy is heavy-ball momentum, ``v = mu * v + g; update = lr * v`` (one state slot, one derived scalar), held to
a plain float64 formula written here. It runs through ``Updater.apply`` (reference and fused paths) and through
``ShardState`` (no Ray). A rule that registers no kernels runs the reference path under kernel="auto" and gets a
clear error under kernel="fused"; a subclass does not inherit its parent's kernels. The updater registry is
patched per test, so the toy names never leak into other tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.updaters import FusedKernels, ParamGroup, Updater, base, from_config, fused_cpu, fused_gpu

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False

STEPS = 12
LR, MU = 0.05, 0.8


@pytest.fixture
def rules(monkeypatch):
    """Step 1-3 of the doc: the class, its reference formula, its kernels (and a second rule without them)."""
    monkeypatch.setattr(base, "UPDATER_TYPES", dict(base.UPDATER_TYPES))

    class HeavyBall(Updater):
        r"""Heavy-ball momentum: ``v = mu * v + g; update = lr * v``; state ``V`` starts at 0."""

        state_keys = ("V",)
        defaults = {"learning_rate": 0.01, "momentum": 0.9}
        schedulable = ("learning_rate",)

        def __init__(self, learning_rate=0.01, momentum=0.9):
            self._set_hyperparameters(learning_rate=learning_rate, momentum=momentum)

        def _validate(self, name, value):
            if name == "momentum":
                return base.check_unit_interval(type(self).__name__, name, value)
            return super()._validate(name, value)

        def rule_scalars(self, iteration, epoch):
            return (self.learning_rate_at(iteration, epoch), self.momentum)

        def reference_update(self, g, state, scalars):
            lr, mu = scalars
            v = state[0, ...]
            v *= mu
            v += g
            return lr * v

        def _element(gi, v, lr, mu):
            v_new = v * mu + gi
            return lr * v_new, v_new

        fused = FusedKernels(element=_element, cuda="v = v * mu + gi; compute_t update = lr * v;")

    class HeavyBallNoKernels(HeavyBall):
        """The same math, no ``fused`` of its own: kernels are not inherited."""

    return HeavyBall, HeavyBallNoKernels


def plain_heavy_ball(params, grads):
    """The float64 formula, element by element, independent of the updater code."""
    p = [float(x) for x in np.asarray(params, dtype=np.float64).ravel()]
    v = [0.0] * len(p)
    for g in grads:
        for i, gi in enumerate(np.asarray(g, dtype=np.float64).ravel()):
            v[i] = MU * v[i] + float(gi)
            p[i] -= LR * v[i]
    return np.array(p).reshape(np.shape(params))


def _problem(dtype, shape=(30, 7)):
    rng = np.random.default_rng(7)
    params = rng.normal(size=shape).astype(dtype)
    grads = [rng.normal(size=shape).astype(dtype) for _ in range(STEPS)]
    return params, grads


def _run(updater, params, grads, kernel):
    params = params.copy()
    state = updater.init(params)
    for iteration, g in enumerate(grads):
        updater.apply(params, g, state, iteration, kernel=kernel)
    return params, state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_reference_path_matches_the_plain_formula(rules, dtype):
    heavy_ball, _ = rules
    params, grads = _problem(dtype)
    got, state = _run(heavy_ball(learning_rate=LR, momentum=MU), params, grads, "reference")
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got, plain_heavy_ball(params, grads), **tolerance)
    assert state.shape == (1,) + params.shape


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed: no fused CPU path")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_fused_kernel_agrees_with_the_reference_bit_for_bit(rules, dtype):
    heavy_ball, _ = rules
    updater = heavy_ball(learning_rate=LR, momentum=MU)
    assert fused_cpu.kernel_for(updater, dtype) is not None
    params, grads = _problem(dtype)
    fused_params, fused_state = _run(updater, params, grads, "fused")
    reference_params, reference_state = _run(updater, params, grads, "reference")
    np.testing.assert_array_equal(fused_params, reference_params)
    np.testing.assert_array_equal(fused_state, reference_state)


def test_the_rule_round_trips_through_its_config(rules):
    heavy_ball, _ = rules
    updater = heavy_ball(learning_rate=LR, momentum=MU)
    assert updater.to_config() == {"type": "HeavyBall", "version": 1, "learning_rate": LR, "momentum": MU}
    assert from_config(updater.to_config()) == updater
    with pytest.raises(ValueError, match="HeavyBall: momentum must be in \\[0, 1\\), got 1.5"):
        heavy_ball(momentum=1.5)


@pytest.mark.parametrize("kernels", ["fused", "none"])
def test_the_rule_runs_in_a_shard_state_like_the_plain_formula(rules, kernels):
    """Through the parameter server's logic (no Ray): two parameters on one shard, one push per step."""
    rule = rules[0] if kernels == "fused" else rules[1]
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    grads = [{n: rng.normal(size=a.shape).astype(np.float32) for n, a in params.items()} for _ in range(STEPS)]
    groups = [ParamGroup(rule(learning_rate=LR, momentum=MU))]
    layout = ParameterLayout.build({n: a.shape for n, a in params.items()},
                                   {n: str(a.dtype) for n, a in params.items()}, 1, {n: 0 for n in params})
    shard = ShardState(0, layout.shard_pieces[0], groups, layout.pack(0, params)[0])
    assert all((kernel is not None) == (kernels == "fused" and HAVE_NUMBA) for kernel in shard.kernels.values())
    for seq, step in enumerate(grads, start=1):
        payload, present = layout.pack(0, step)
        assert shard.push("client", seq, 0, payload, present).errors == []
    got = {n: np.empty_like(a) for n, a in params.items()}
    layout.unpack_into(0, shard.read(), got)
    for name in params:
        expected = plain_heavy_ball(params[name], [step[name] for step in grads])
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_rule_without_kernels_runs_the_reference_path_and_fused_says_why(rules):
    heavy_ball, no_kernels = rules
    updater = no_kernels(learning_rate=LR, momentum=MU)
    assert fused_cpu.kernel_for(updater, np.float32) is None
    assert fused_gpu.kernel_for(updater, np.float32) is None
    params, grads = _problem(np.float32)
    auto, _ = _run(updater, params, grads, "auto")
    reference, _ = _run(heavy_ball(learning_rate=LR, momentum=MU), params, grads, "reference")
    np.testing.assert_array_equal(auto, reference)
    untouched = params.copy()
    with pytest.raises(ValueError, match="kernel='fused' needs a rule that registers fused kernels; "
                                         "HeavyBallNoKernels registers none"):
        updater.apply(params, grads[0], updater.init(params), 0, kernel="fused")
    np.testing.assert_array_equal(params, untouched)


def test_a_malformed_registration_is_refused_when_the_class_is_defined(monkeypatch):
    monkeypatch.setattr(base, "UPDATER_TYPES", dict(base.UPDATER_TYPES))

    def two_slots_missing(gi, lr):
        return (lr * gi,)

    with pytest.raises(ValueError, match=r"Bad.fused: element must take \(gi, <one argument per state slot "
                                         r"\['M', 'V'\]>, \*kernel_scalars\), got \(gi, lr\)"):
        type("Bad", (Updater,), {"state_keys": ("M", "V"), "fused": FusedKernels(element=two_slots_missing)})
    with pytest.raises(TypeError, match="Worse.fused must be a FusedKernels or None, got dict"):
        type("Worse", (Updater,), {"fused": {"element": two_slots_missing}})
    with pytest.raises(ValueError, match="Empty.fused: element is required unless zero_update is set"):
        type("Empty", (Updater,), {"fused": FusedKernels()})
