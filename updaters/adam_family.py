"""The Adam family of DL4J updaters: Adam, AdaMax, Nadam, AMSGrad, AdaBelief (notation as ``rules.py``).

They share the hyperparameters ``learning_rate, beta1, beta2, epsilon`` and ND4J's bias-corrected step size
``alpha_t``; each class carries its reference formula and its fused kernels (``base.FusedKernels``).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Updater, array_module
from .fused_kernels import FusedKernels


def _adam_like(s):
    """``(alpha, b1, b2, eps)`` -> the kernels' ``(alpha, b1, 1 - b1, b2, 1 - b2, eps)``."""
    alpha, b1, b2, eps = s[:4]
    return (alpha, b1, 1.0 - b1, b2, 1.0 - b2, eps)


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
        xp = array_module(g)
        m, v = state[0, ...], state[1, ...]
        _update_moments(g, m, v, b1, b2)
        return alpha * m / (xp.sqrt(v) + eps)

    def _element(gi, m, v, alpha, b1, one_minus_b1, b2, one_minus_b2, eps):
        m_new = m * b1 + one_minus_b1 * gi
        v_new = v * b2 + one_minus_b2 * (gi * gi)
        return alpha * m_new / (np.sqrt(v_new) + eps), m_new, v_new

    fused = FusedKernels(element=_element, kernel_scalars=_adam_like,
                         cuda="m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
                              "compute_t update = alpha * m / (rayps_sqrt(v) + eps);")


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
        xp = array_module(g)
        m, u = state[0, ...], state[1, ...]
        m *= b1
        m += (1.0 - b1) * g
        u *= b2
        xp.maximum(u, xp.abs(g), out=u)
        u += 1e-32
        return alpha * m / u

    def _element(gi, m, u, alpha, b1, one_minus_b1, b2, tiny):
        m_new = m * b1 + one_minus_b1 * gi
        decayed, magnitude = u * b2, abs(gi)
        u_new = (decayed if (decayed >= magnitude or decayed != decayed) else magnitude) + tiny  # np.maximum
        return alpha * m_new / u_new, m_new, u_new

    fused = FusedKernels(element=_element, kernel_scalars=lambda s: (s[0], s[1], 1.0 - s[1], s[2], 1e-32),
                         cuda="m = m * b1 + one_minus_b1 * gi; "
                              "u = rayps_maximum<compute_t>(u * b2, rayps_abs(gi)) + tiny;"
                              "compute_t update = alpha * m / u;")


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
        xp = array_module(g)
        m, v = state[0, ...], state[1, ...]
        _update_moments(g, m, v, b1, b2)
        return lr * ((b1 * m + (1.0 - b1) * g) / one_minus_b1t) / (xp.sqrt(v) + eps)

    def _element(gi, m, v, lr, b1, one_minus_b1, b2, one_minus_b2, eps, one_minus_b1t):
        m_new = m * b1 + one_minus_b1 * gi
        v_new = v * b2 + one_minus_b2 * (gi * gi)
        return lr * ((b1 * m_new + one_minus_b1 * gi) / one_minus_b1t) / (np.sqrt(v_new) + eps), m_new, v_new

    fused = FusedKernels(element=_element, kernel_scalars=lambda s: _adam_like(s) + (s[4],),
                         cuda="m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
                              "compute_t update = lr * ((b1 * m + one_minus_b1 * gi) / one_minus_b1t)"
                              " / (rayps_sqrt(v) + eps);")


class AMSGrad(_AdamFamily):
    r"""AMSGrad (``AMSGradUpdater``)::

        m, v as Adam;  vhat = max(vhat, v)
        update = alpha_t * m / (sqrt(vhat) + eps)          (alpha_t as Adam)

    State ``[M | V | V_HAT]`` starts at 0. Defaults as Adam.
    """

    state_keys = ("M", "V", "V_HAT")

    def reference_update(self, g, state, scalars):
        alpha, b1, b2, eps = scalars
        xp = array_module(g)
        m, v, vhat = state[0, ...], state[1, ...], state[2, ...]
        _update_moments(g, m, v, b1, b2)
        xp.maximum(vhat, v, out=vhat)
        return alpha * m / (xp.sqrt(vhat) + eps)

    def _element(gi, m, v, vhat, alpha, b1, one_minus_b1, b2, one_minus_b2, eps):
        m_new = m * b1 + one_minus_b1 * gi
        v_new = v * b2 + one_minus_b2 * (gi * gi)
        vhat_new = vhat if (vhat >= v_new or vhat != vhat) else v_new  # np.maximum: NaN wins
        return alpha * m_new / (np.sqrt(vhat_new) + eps), m_new, v_new, vhat_new

    fused = FusedKernels(element=_element, kernel_scalars=_adam_like,
                         cuda="m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
                              "vhat = rayps_maximum<compute_t>(vhat, v);"
                              "compute_t update = alpha * m / (rayps_sqrt(vhat) + eps);")


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
        xp = array_module(g)
        m, s = state[0, ...], state[1, ...]
        m *= b1
        m += (1.0 - b1) * g
        d = g - m
        s *= b2
        s += (1.0 - b2) * (d * d)
        s += eps
        return alpha * m / (xp.sqrt(s) + eps)

    def _element(gi, m, s, alpha, b1, one_minus_b1, b2, one_minus_b2, eps):
        m_new = m * b1 + one_minus_b1 * gi
        d = gi - m_new
        s_new = (s * b2 + one_minus_b2 * (d * d)) + eps
        return alpha * m_new / (np.sqrt(s_new) + eps), m_new, s_new

    fused = FusedKernels(element=_element, kernel_scalars=_adam_like,
                         cuda="m = m * b1 + one_minus_b1 * gi; compute_t d = gi - m;"
                              "s = (s * b2 + one_minus_b2 * (d * d)) + eps;"
                              "compute_t update = alpha * m / (rayps_sqrt(s) + eps);")
