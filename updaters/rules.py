"""The eleven DL4J updaters, with ND4J's math as coded (not as the seed page prints it): the plain rules here,
the Adam family in ``adam_family.py``.

Each rule is one class: its hyperparameters, ``rule_scalars``, the reference formula and, as ``fused``, its
one-pass kernels (the per-element math for numba and the same statements for CuPy; see ``base.FusedKernels``).

Notation: ``g`` the (adjusted) gradient, ``iteration`` counts from 0, ``t = iteration + 1``. Each rule returns
the *update*; the caller does ``params -= update``. Sources: ``nd4j/.../org/nd4j/linalg/learning/*Updater.java``,
``.../learning/config/*.java`` and ``libnd4j/include/ops/declarable/helpers/cpu/updater*.cpp`` in
deeplearning4j/deeplearning4j; the exact table is ../shared/DL4J-UPDATERS.md.
"""

from __future__ import annotations

import numpy as np

from .adam_family import AdaBelief, AdaMax, Adam, AMSGrad, Nadam
from .base import Updater, array_module, resolve
from .fused_kernels import FusedKernels


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

    def _element(gi, lr):
        return (lr * gi,)

    fused = FusedKernels(element=_element, cuda="compute_t update = lr * gi;")


class NoOp(Updater):
    r"""No update: :math:`update = 0` (parameters unchanged). DL4J ``NoOpUpdater``; no learning rate."""

    defaults = {}

    def __init__(self):
        pass

    def rule_scalars(self, iteration, epoch):
        return ()

    def reference_update(self, g, state, scalars):
        return array_module(g).zeros_like(g)

    fused = FusedKernels(zero_update=True)


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

    def _element(gi, v, lr, mu, one_plus_mu):
        v_new = v * mu - lr * gi
        return mu * v - one_plus_mu * v_new, v_new

    fused = FusedKernels(element=_element, kernel_scalars=lambda s: (s[0], s[1], 1.0 + s[1]),
                         cuda="compute_t v_prev = v; v = v_prev * mu - lr * gi;"
                              "compute_t update = mu * v_prev - one_plus_mu * v;")


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
        xp = array_module(g)
        h = state[0, ...]
        h += g * g
        return lr * g / (xp.sqrt(h) + eps)

    def _element(gi, h, lr, eps):
        h_new = h + gi * gi
        return lr * gi / (np.sqrt(h_new) + eps), h_new

    fused = FusedKernels(element=_element,
                         cuda="h = h + gi * gi; compute_t update = lr * gi / (rayps_sqrt(h) + eps);")


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
        xp = array_module(g)
        G = state[0, ...]
        G *= decay
        G += (1.0 - decay) * (g * g)
        return lr * g / (xp.sqrt(G) + eps)

    def _element(gi, G, lr, decay, one_minus_decay, eps):
        G_new = G * decay + one_minus_decay * (gi * gi)
        return lr * gi / (np.sqrt(G_new) + eps), G_new

    fused = FusedKernels(element=_element, kernel_scalars=lambda s: (s[0], s[1], 1.0 - s[1], s[2]),
                         cuda="G = G * decay + one_minus_decay * (gi * gi);"
                              "compute_t update = lr * gi / (rayps_sqrt(G) + eps);")


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
        xp = array_module(g)
        msg, msdx = state[0, ...], state[1, ...]
        msg *= rho
        msg += (1.0 - rho) * (g * g)
        update = g * xp.sqrt(msdx + eps) / xp.sqrt(msg + eps)
        msdx *= rho
        msdx += (1.0 - rho) * (update * update)
        return update

    def _element(gi, msg, msdx, rho, one_minus_rho, eps):
        msg_new = msg * rho + one_minus_rho * (gi * gi)
        update = gi * np.sqrt(msdx + eps) / np.sqrt(msg_new + eps)
        return update, msg_new, msdx * rho + one_minus_rho * (update * update)

    fused = FusedKernels(element=_element, kernel_scalars=lambda s: (s[0], 1.0 - s[0], s[1]),
                         cuda="msg = msg * rho + one_minus_rho * (gi * gi);"
                              "compute_t update = gi * rayps_sqrt(msdx + eps) / rayps_sqrt(msg + eps);"
                              "msdx = msdx * rho + one_minus_rho * (update * update);")


ALL_UPDATERS = (Sgd, Nesterovs, AdaGrad, RmsProp, AdaDelta, Adam, AdaMax, Nadam, AMSGrad, AdaBelief, NoOp)
