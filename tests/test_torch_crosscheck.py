"""rayps' DL4J updaters (reference path) against torch.optim, 30 steps, float64, the same gradients fed to both.

What holds and why (shared/DL4J-UPDATERS.md, "Cross-checks"):

* Sgd == SGD; AdaGrad == Adagrad(initial_accumulator_value=eps, eps=eps); AdaDelta == Adadelta(lr=1);
  Nesterovs == SGD(nesterov=True, dampening=0) -- the same math, only the order of float operations differs,
  so these agree to a few ulps (rtol 1e-12).
* RmsProp == RMSprop(alpha=rms_decay, eps) once torch's square_avg starts at eps (DL4J's init) instead of 0.
* Adam/AMSGrad: torch puts eps on the bias-corrected sqrt(v); ND4J on the uncorrected one. They agree when eps
  is negligible, and exactly when torch's eps at step t is eps/sqrt(1-b2^t) (derivation at the Adam tests).
* AdaMax == Adamax with a negligible eps: torch adds eps to |g| inside the max, ND4J adds 1e-32 after it; both
  vanish in float64 next to |g| ~ 1e-3..1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0)")

from rayps.updaters import AdaDelta, AdaGrad, AdaMax, Adam, AMSGrad, Nesterovs, RmsProp, Sgd  # noqa: E402

STEPS = 30
SHAPES = [(4, 5), (7,)]
TIGHT = dict(rtol=1e-12, atol=1e-14)


def _gradients(seed):
    """30 steps of gradients per parameter; the scale drops after 8 steps so AMSGrad's max matters."""
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape) * (3.0 if k < 8 else 0.2) + 0.05 for shape in SHAPES] for k in range(STEPS)]


def _initial_params(seed):
    rng = np.random.default_rng(seed + 1000)
    return [rng.normal(size=shape) for shape in SHAPES]


def run_rayps(updater, seed):
    params = _initial_params(seed)
    states = [updater.init(p) for p in params]
    for iteration, grads in enumerate(_gradients(seed)):
        for p, g, s in zip(params, grads, states):
            updater.apply(p, g, s, iteration, kernel="reference")
    return params, [updater.state_views(s) for s in states]


def run_torch(make_optimizer, seed, before_step=None, seed_state=None):
    """``make_optimizer(tensors)``; ``before_step(optimizer, t)`` may adjust the param group at step t (from 1);
    ``seed_state(optimizer, tensor)`` may set the initial state of a tensor."""
    tensors = [torch.tensor(p, dtype=torch.float64) for p in _initial_params(seed)]
    optimizer = make_optimizer(tensors)
    if seed_state is not None:
        for t in tensors:
            seed_state(optimizer, t)
    for step, grads in enumerate(_gradients(seed), start=1):
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        if before_step is not None:
            before_step(optimizer, step)
        optimizer.step()
    return [t.detach().numpy() for t in tensors], [optimizer.state[t] for t in tensors]


def _assert_params_close(ours, theirs, **tol):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, **tol)


def _moved(seed, ours):
    """A cross-check where neither side moved could not fail: require that the params did move."""
    for a, b in zip(ours, _initial_params(seed)):
        assert np.all(a != b)


# ---------------------------------------------------------------------------------------------------------
# Exact (to a few ulps)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1e-3, 0.07])
def test_sgd(lr):
    ours, _ = run_rayps(Sgd(learning_rate=lr), seed=1)
    theirs, _ = run_torch(lambda ts: torch.optim.SGD(ts, lr=lr, foreach=False), seed=1)
    _assert_params_close(ours, theirs, **TIGHT)
    _moved(1, ours)


@pytest.mark.parametrize("lr,mu", [(0.1, 0.9), (0.02, 0.5)])
def test_nesterovs(lr, mu):
    r"""DL4J's Nesterov form equals torch's nesterov=True, dampening=0, for a constant learning rate.

    DL4J (v_0 = 0):   v_t = mu v_{t-1} - lr g_t ;  update = mu v_{t-1} - (1+mu) v_t ;  w -= update
    torch (b_0 = 0):  b_t = mu b_{t-1} + g_t   (first step b_1 = g_1, the same value) ;  w -= lr (g_t + mu b_t)

    With lr constant, v_t = -lr b_t for all t (induction: both start at 0 and obey the same linear recursion
    times -lr). Then
        update = mu v_{t-1} - (1+mu)(mu v_{t-1} - lr g_t)
               = -mu^2 v_{t-1} + (1+mu) lr g_t
               = lr (mu^2 b_{t-1} + (1+mu) g_t)
               = lr (g_t + mu (mu b_{t-1} + g_t)) = lr (g_t + mu b_t)
    which is torch's step. (With a learning-rate *schedule* they differ: DL4J's v carries past lr's, torch's b
    does not.) The state maps as V = -lr * momentum_buffer.
    """
    ours, our_state = run_rayps(Nesterovs(learning_rate=lr, momentum=mu), seed=2)
    theirs, their_state = run_torch(
        lambda ts: torch.optim.SGD(ts, lr=lr, momentum=mu, nesterov=True, dampening=0, foreach=False), seed=2)
    _assert_params_close(ours, theirs, rtol=1e-11, atol=1e-13)
    for ours_s, theirs_s in zip(our_state, their_state):
        np.testing.assert_allclose(ours_s["V"], -lr * theirs_s["momentum_buffer"].numpy(), rtol=1e-11, atol=1e-14)
    _moved(2, ours)


@pytest.mark.parametrize("lr,eps", [(0.1, 1e-6), (0.03, 1e-2)])
def test_adagrad(lr, eps):
    """DL4J starts the accumulator at eps and adds eps outside the sqrt: torch with the same two settings."""
    ours, our_state = run_rayps(AdaGrad(learning_rate=lr, epsilon=eps), seed=3)
    theirs, their_state = run_torch(
        lambda ts: torch.optim.Adagrad(ts, lr=lr, initial_accumulator_value=eps, eps=eps, foreach=False), seed=3)
    _assert_params_close(ours, theirs, **TIGHT)
    for ours_s, theirs_s in zip(our_state, their_state):
        (h,) = ours_s.values()
        np.testing.assert_allclose(h, theirs_s["sum"].numpy(), rtol=1e-13)
    _moved(3, ours)


@pytest.mark.parametrize("rho,eps", [(0.95, 1e-6), (0.6, 1e-3)])
def test_adadelta(rho, eps):
    ours, our_state = run_rayps(AdaDelta(rho=rho, epsilon=eps), seed=4)
    theirs, their_state = run_torch(lambda ts: torch.optim.Adadelta(ts, lr=1.0, rho=rho, eps=eps, foreach=False),
                                    seed=4)
    _assert_params_close(ours, theirs, **TIGHT)
    for ours_s, theirs_s in zip(our_state, their_state):
        msg, msdx = ours_s.values()
        np.testing.assert_allclose(msg, theirs_s["square_avg"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(msdx, theirs_s["acc_delta"].numpy(), rtol=1e-11)
    _moved(4, ours)


def _rmsprop_state_at_eps(eps):
    def seed_state(optimizer, tensor):
        optimizer.state[tensor] = {"step": torch.tensor(0.0), "square_avg": torch.full_like(tensor, eps)}
    return seed_state


@pytest.mark.parametrize("lr,decay,eps", [(0.1, 0.95, 1e-8), (0.01, 0.8, 1e-2)])
def test_rmsprop_with_torch_state_starting_at_eps(lr, decay, eps):
    """Same formula as torch's plain RMSprop; only the initial square_avg differs (DL4J: eps, torch: 0)."""
    ours, our_state = run_rayps(RmsProp(learning_rate=lr, rms_decay=decay, epsilon=eps), seed=5)
    theirs, their_state = run_torch(
        lambda ts: torch.optim.RMSprop(ts, lr=lr, alpha=decay, eps=eps, foreach=False), seed=5,
        seed_state=_rmsprop_state_at_eps(eps))
    _assert_params_close(ours, theirs, **TIGHT)
    for ours_s, theirs_s in zip(our_state, their_state):
        np.testing.assert_allclose(ours_s["G"], theirs_s["square_avg"].numpy(), rtol=1e-13)
    _moved(5, ours)


def test_rmsprop_differs_from_torch_default_init():
    """The eps initial state is what separates the two: with torch's 0 start they part (visible at eps=0.1)."""
    ours, _ = run_rayps(RmsProp(learning_rate=0.01, epsilon=0.1), seed=5)
    theirs, _ = run_torch(lambda ts: torch.optim.RMSprop(ts, lr=0.01, alpha=0.95, eps=0.1, foreach=False), seed=5)
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, theirs)) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Adam / AMSGrad: the eps placement
# ---------------------------------------------------------------------------------------------------------
#
# ND4J:  update = lr sqrt(c2)/c1 * m / (sqrt(v) + eps)                      c1 = 1-b1^t, c2 = 1-b2^t
# torch: update = lr/c1 * m / (sqrt(v)/sqrt(c2) + eps')
#               = lr sqrt(c2)/c1 * m / (sqrt(v) + eps' sqrt(c2))
# so the two are the same function when eps' = eps / sqrt(c2) at every step, and with a fixed eps' = eps they
# differ by a relative eps (1 - sqrt(c2)) / sqrt(v) in each update: with eps = 1e-16 and sqrt(v) >= ~1e-5 (the
# smallest |g| * sqrt(1-b2) in these runs) that is <= 1e-11, hence rtol 1e-9 over 30 steps. AMSGrad is the same
# with vhat = max(vhat, v) (torch keeps max_exp_avg_sq, also uncorrected). torch also updates m by lerp
# (m + (1-b1)(g-m)) where ND4J does b1 m + (1-b1) g: a rounding difference only.


@pytest.mark.parametrize("cls", [Adam, AMSGrad])
def test_adam_family_with_tiny_epsilon(cls):
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-16
    ours, our_state = run_rayps(cls(learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps), seed=6)
    theirs, their_state = run_torch(lambda ts: torch.optim.Adam(
        ts, lr=lr, betas=(b1, b2), eps=eps, amsgrad=cls is AMSGrad, foreach=False), seed=6)
    _assert_params_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for ours_s, theirs_s in zip(our_state, their_state):
        np.testing.assert_allclose(ours_s["M"], theirs_s["exp_avg"].numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ours_s["V"], theirs_s["exp_avg_sq"].numpy(), rtol=1e-12)
        if cls is AMSGrad:
            np.testing.assert_allclose(ours_s["V_HAT"], theirs_s["max_exp_avg_sq"].numpy(), rtol=1e-12)
    _moved(6, ours)


def _eps_over_sqrt_c2(eps, b2):
    def before_step(optimizer, t):
        for group in optimizer.param_groups:
            group["eps"] = eps / math.sqrt(1.0 - b2 ** t)
    return before_step


@pytest.mark.parametrize("cls", [Adam, AMSGrad])
@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.1])
def test_adam_family_with_rescaled_epsilon_is_exact(cls, eps):
    """Feeding torch eps/sqrt(1-b2^t) at step t makes the two the same function for any eps (see above)."""
    lr, b1, b2 = 0.02, 0.8, 0.95
    ours, _ = run_rayps(cls(learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps), seed=7)
    theirs, _ = run_torch(lambda ts: torch.optim.Adam(ts, lr=lr, betas=(b1, b2), eps=eps, amsgrad=cls is AMSGrad,
                                                      foreach=False),
                          seed=7, before_step=_eps_over_sqrt_c2(eps, b2))
    _assert_params_close(ours, theirs, **TIGHT)
    _moved(7, ours)


@pytest.mark.parametrize("cls", [Adam, AMSGrad])
def test_adam_family_differs_with_a_large_fixed_epsilon(cls):
    """Without the rescaling, a large eps separates them: the placement of eps is the only difference."""
    lr, b1, b2, eps = 0.02, 0.8, 0.95, 0.1
    ours, _ = run_rayps(cls(learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps), seed=7)
    theirs, _ = run_torch(lambda ts: torch.optim.Adam(ts, lr=lr, betas=(b1, b2), eps=eps, amsgrad=cls is AMSGrad,
                                                      foreach=False), seed=7)
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, theirs)) > 1e-4


def test_adamax_with_negligible_epsilon():
    """torch: u = max(b2 u, |g| + eps); ND4J: u = max(b2 u, |g|) + 1e-32. With eps = 1e-32 both additions are
    absorbed by float64 rounding here (|g|, u >= ~1e-4), so the states and steps agree to rounding."""
    lr, b1, b2 = 0.01, 0.9, 0.999
    ours, our_state = run_rayps(AdaMax(learning_rate=lr, beta1=b1, beta2=b2), seed=8)
    theirs, their_state = run_torch(
        lambda ts: torch.optim.Adamax(ts, lr=lr, betas=(b1, b2), eps=1e-32, foreach=False), seed=8)
    _assert_params_close(ours, theirs, **TIGHT)
    for ours_s, theirs_s in zip(our_state, their_state):
        np.testing.assert_allclose(ours_s["V"], theirs_s["exp_inf"].numpy(), rtol=1e-15)
    _moved(8, ours)
