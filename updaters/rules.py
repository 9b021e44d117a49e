"""The eleven DL4J updaters, with ND4J's math as coded (not as the seed page prints it).

Notation: ``g`` the (adjusted) gradient, ``iteration`` counts from 0, ``t = iteration + 1``. Each rule returns
the *update*; the caller does ``params -= update``. Sources: ``nd4j/.../org/nd4j/linalg/learning/*Updater.java``,
``.../learning/config/*.java`` and ``libnd4j/include/ops/declarable/helpers/cpu/updater*.cpp`` in
deeplearning4j/deeplearning4j; the exact table is ../shared/DL4J-UPDATERS.md.
"""

from __future__ import annotations

import math

from .base import Updater, _array_module, resolve


def _bias_corrected_alpha(learning_rate: float, beta1: float, beta2: float, epsilon: float, t: int) -> float:
    """ND4J's ``alpha_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, replaced by epsilon when NaN, 0 or inf.

    Python floats are IEEE doubles with a correctly rounded ``sqrt``: the same value as the float64 NumPy
    expression, without its per-call cost (this runs once per step on every shard)."""
    denominator = 1.0 - beta1 ** t
    if denominator == 0.0:
        return epsilon
    alpha = learning_rate * math.sqrt(1.0 - beta2 ** t) / denominator
    if math.isnan(alpha) or alpha == 0.0 or math.isinf(alpha):
        alpha = epsilon
    return alpha


class Sgd(Updater):
    r"""Plain SGD. :math:`update = lr \cdot g`.  DL4J ``SgdUpdater``; defaults lr 1e-3."""

    defaults = {"learning_rate": 1e-3}
    schedulable = ("learning_rate",)

    def __init__(self, learning_rate=1e-3):
        self._set_hyperparameters(learning_rate=learning_rate)

    def rule_scalars(self, iteration, epoch):
        return (self.learning_rate_at(iteration, epoch),)

    def reference_update(self, g, state, scalars):
        (lr,) = scalars
        return lr * g


class NoOp(Updater):
    r"""No update: :math:`update = 0` (parameters unchanged). DL4J ``NoOpUpdater``; no learning rate."""

    defaults = {}

    def __init__(self):
        pass

    def rule_scalars(self, iteration, epoch):
        return ()

    def reference_update(self, g, state, scalars):
        return _array_module(g).zeros_like(g)


class Nesterovs(Updater):
    r"""Nesterov momentum as ND4J codes it (``NesterovsUpdater``)::

        v_prev = v
        v      = mu * v - lr * g
        update = mu * v_prev - (1 + mu) * v

    State ``V`` starts at 0. Defaults: lr 0.1, momentum 0.9 (both may be schedules). The seed page shows
    classical momentum (``theta += v``); ND4J has only this Nesterov form.
    """

    state_keys = ("V",)
    defaults = {"learning_rate": 0.1, "momentum": 0.9}
    schedulable = ("learning_rate", "momentum")

    def __init__(self, learning_rate=0.1, momentum=0.9):
        self._set_hyperparameters(learning_rate=learning_rate, momentum=momentum)

    def rule_scalars(self, iteration, epoch):
        return (self.learning_rate_at(iteration, epoch), resolve(self.momentum, iteration, epoch))

    def reference_update(self, g, state, scalars):
        lr, mu = scalars
        v = state[0, ...]
        v_prev = v.copy()
        v *= mu
        v -= lr * g
        return mu * v_prev - (1.0 + mu) * v


class AdaGrad(Updater):
    r"""AdaGrad (``AdaGradUpdater``)::

        h      += g * g
        update  = lr * g / (sqrt(h) + eps)

    State ``grad`` (h) starts at **epsilon**, not 0. Defaults: lr 0.1, eps 1e-6. The seed page squares the
    gradient in the numerator (a typo).
    """

    state_keys = ("grad",)
    defaults = {"learning_rate": 0.1, "epsilon": 1e-6}
    schedulable = ("learning_rate",)

    def __init__(self, learning_rate=0.1, epsilon=1e-6):
        self._set_hyperparameters(learning_rate=learning_rate, epsilon=epsilon)

    def state_initial_values(self):
        return (self.epsilon,)

    def rule_scalars(self, iteration, epoch):
        return (self.learning_rate_at(iteration, epoch), self.epsilon)

    def reference_update(self, g, state, scalars):
        lr, eps = scalars
        xp = _array_module(g)
        h = state[0, ...]
        h += g * g
        return lr * g / (xp.sqrt(h) + eps)


class RmsProp(Updater):
    r"""RMSProp, plain (``RmsPropUpdater``)::

        G      = d * G + (1 - d) * g * g
        update = lr * g / (sqrt(G) + eps)

    State ``G`` starts at **epsilon**. Defaults: lr 0.1, rms_decay 0.95, eps 1e-8. The seed page shows a
    centred variant with momentum and eps inside the sqrt; ND4J codes neither.
    """

    state_keys = ("G",)
    defaults = {"learning_rate": 0.1, "rms_decay": 0.95, "epsilon": 1e-8}
    schedulable = ("learning_rate",)

    def __init__(self, learning_rate=0.1, rms_decay=0.95, epsilon=1e-8):
        self._set_hyperparameters(learning_rate=learning_rate, rms_decay=rms_decay, epsilon=epsilon)

    def state_initial_values(self):
        return (self.epsilon,)

    def rule_scalars(self, iteration, epoch):
        return (self.learning_rate_at(iteration, epoch), self.rms_decay, self.epsilon)

    def reference_update(self, g, state, scalars):
        lr, decay, eps = scalars
        xp = _array_module(g)
        G = state[0, ...]
        G *= decay
        G += (1.0 - decay) * (g * g)
        return lr * g / (xp.sqrt(G) + eps)


class AdaDelta(Updater):
    r"""AdaDelta (``AdaDeltaUpdater``); no learning rate::

        msg    = rho * msg + (1 - rho) * g * g
        update = g * sqrt(msdx + eps) / sqrt(msg + eps)
        msdx   = rho * msdx + (1 - rho) * update * update

    State ``[msg | msdx]`` starts at 0. Defaults: rho 0.95, eps 1e-6.
    """

    state_keys = ("msg", "msdx")
    defaults = {"rho": 0.95, "epsilon": 1e-6}

    def __init__(self, rho=0.95, epsilon=1e-6):
        self._set_hyperparameters(rho=rho, epsilon=epsilon)

    def rule_scalars(self, iteration, epoch):
        return (self.rho, self.epsilon)

    def reference_update(self, g, state, scalars):
        rho, eps = scalars
        xp = _array_module(g)
        msg, msdx = state[0, ...], state[1, ...]
        msg *= rho
        msg += (1.0 - rho) * (g * g)
        update = g * xp.sqrt(msdx + eps) / xp.sqrt(msg + eps)
        msdx *= rho
        msdx += (1.0 - rho) * (update * update)
        return update


def _update_moments(g, m, v, b1: float, b2: float) -> None:
    """``m = b1*m + (1-b1)*g`` and ``v = b2*v + (1-b2)*g*g``, in place (Adam, Nadam, AMSGrad)."""
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * (g * g)


class _AdamFamily(Updater):
    """Shared hyperparameters of Adam, AdaMax, Nadam, AMSGrad and AdaBelief."""

    defaults = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}
    schedulable = ("learning_rate",)

    def __init__(self, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8):
        self._set_hyperparameters(learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon)

    def rule_scalars(self, iteration, epoch):
        lr = self.learning_rate_at(iteration, epoch)
        alpha = _bias_corrected_alpha(lr, self.beta1, self.beta2, self.epsilon, iteration + 1)
        return (alpha, self.beta1, self.beta2, self.epsilon)


class Adam(_AdamFamily):
    r"""Adam as ND4J codes it (``AdamUpdater``)::

        m       = b1 * m + (1 - b1) * g
        v       = b2 * v + (1 - b2) * g * g
        alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t)        (eps if NaN, 0 or inf)
        update  = alpha_t * m / (sqrt(v) + eps)

    State ``[M | V]`` starts at 0. Defaults: lr 1e-3, b1 0.9, b2 0.999, eps 1e-8. The seed page bias-corrects
    m and v separately and adds eps to sqrt(v_hat); ND4J folds both corrections into alpha_t.
    """

    state_keys = ("M", "V")

    def reference_update(self, g, state, scalars):
        alpha, b1, b2, eps = scalars
        xp = _array_module(g)
        m, v = state[0, ...], state[1, ...]
        _update_moments(g, m, v, b1, b2)
        return alpha * m / (xp.sqrt(v) + eps)


class AdaMax(_AdamFamily):
    r"""AdaMax (``AdaMaxUpdater``)::

        m       = b1 * m + (1 - b1) * g
        u       = max(b2 * u, |g|) + 1e-32
        alpha_t = lr / (1 - b1^t)                          (eps if NaN, 0 or inf)
        update  = alpha_t * m / u

    State ``[M | V]`` (V holds u) starts at 0. Defaults as Adam.
    """

    state_keys = ("M", "V")

    def rule_scalars(self, iteration, epoch):
        lr = self.learning_rate_at(iteration, epoch)
        alpha = _bias_corrected_alpha(lr, self.beta1, 0.0, self.epsilon, iteration + 1)
        return (alpha, self.beta1, self.beta2, self.epsilon)

    def reference_update(self, g, state, scalars):
        alpha, b1, b2, _eps = scalars
        xp = _array_module(g)
        m, u = state[0, ...], state[1, ...]
        m *= b1
        m += (1.0 - b1) * g
        u *= b2
        xp.maximum(u, xp.abs(g), out=u)
        u += 1e-32
        return alpha * m / u


class Nadam(_AdamFamily):
    r"""Nadam (``NadamUpdater``); m already updated, v not bias-corrected::

        m      = b1 * m + (1 - b1) * g
        v      = b2 * v + (1 - b2) * g * g
        update = lr * ((b1 * m + (1 - b1) * g) / (1 - b1^t)) / (sqrt(v) + eps)

    State ``[M | V]`` starts at 0. Defaults as Adam.
    """

    state_keys = ("M", "V")

    def rule_scalars(self, iteration, epoch):
        lr = self.learning_rate_at(iteration, epoch)
        return (lr, self.beta1, self.beta2, self.epsilon, 1.0 - self.beta1 ** (iteration + 1))

    def reference_update(self, g, state, scalars):
        lr, b1, b2, eps, one_minus_b1t = scalars
        xp = _array_module(g)
        m, v = state[0, ...], state[1, ...]
        _update_moments(g, m, v, b1, b2)
        return lr * ((b1 * m + (1.0 - b1) * g) / one_minus_b1t) / (xp.sqrt(v) + eps)


class AMSGrad(_AdamFamily):
    r"""AMSGrad (``AMSGradUpdater``)::

        m, v as Adam;  vhat = max(vhat, v)
        update = alpha_t * m / (sqrt(vhat) + eps)          (alpha_t as Adam)

    State ``[M | V | V_HAT]`` starts at 0. Defaults as Adam.
    """

    state_keys = ("M", "V", "V_HAT")

    def reference_update(self, g, state, scalars):
        alpha, b1, b2, eps = scalars
        xp = _array_module(g)
        m, v, vhat = state[0, ...], state[1, ...], state[2, ...]
        _update_moments(g, m, v, b1, b2)
        xp.maximum(vhat, v, out=vhat)
        return alpha * m / (xp.sqrt(vhat) + eps)


class AdaBelief(_AdamFamily):
    r"""AdaBelief (``AdaBeliefUpdater``); m already updated::

        m      = b1 * m + (1 - b1) * g
        s      = b2 * s + (1 - b2) * (g - m)^2 + eps
        update = alpha_t * m / (sqrt(s) + eps)             (alpha_t as Adam)

    State ``[M | S]`` starts at 0. Defaults: lr 1e-3, b1 0.9, b2 0.999, eps **1e-14**.
    """

    state_keys = ("M", "S")
    defaults = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-14}

    def __init__(self, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-14):
        super().__init__(learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon)

    def reference_update(self, g, state, scalars):
        alpha, b1, b2, eps = scalars
        xp = _array_module(g)
        m, s = state[0, ...], state[1, ...]
        m *= b1
        m += (1.0 - b1) * g
        d = g - m
        s *= b2
        s += (1.0 - b2) * (d * d)
        s += eps
        return alpha * m / (xp.sqrt(s) + eps)


ALL_UPDATERS = (Sgd, Nesterovs, AdaGrad, RmsProp, AdaDelta, Adam, AdaMax, Nadam, AMSGrad, AdaBelief, NoOp)
