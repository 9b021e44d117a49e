"""rayps.updaters: the DL4J/ND4J update rules as pure array math (no Ray).

Contract::

    u = Adam(learning_rate=1e-3)
    state = u.init(params)
    u.apply(params, grads, state, iteration, epoch=0)   # in place on params and state; iteration from 0
    u.to_config() -> dict ; from_config(dict) -> Updater
"""

from . import schedules
from .base import StepAdjustments, Updater, from_config, state_dtype_for
from .by_name import DEFAULT_LEARNING_RATES, UPDATERS_BY_FLAG, build_updater
from .fused_kernels import FusedKernels
from .groups import ParameterUpdater, ParamGroup
from .normalization import GRADIENT_NORMALIZATIONS
from .regularization import L1, L2, WeightDecay
from .rules import (ALL_UPDATERS, AdaBelief, AdaDelta, AdaGrad, AdaMax, Adam, AMSGrad, Nadam, Nesterovs, NoOp,
                    RmsProp, Sgd)

__all__ = [
    "ALL_UPDATERS", "AdaBelief", "AdaDelta", "AdaGrad", "AdaMax", "Adam", "AMSGrad", "DEFAULT_LEARNING_RATES",
    "FusedKernels", "GRADIENT_NORMALIZATIONS",
    "L1", "L2", "Nadam", "Nesterovs", "NoOp", "ParamGroup", "ParameterUpdater", "RmsProp", "Sgd", "StepAdjustments",
    "UPDATERS_BY_FLAG", "Updater", "WeightDecay", "build_updater", "from_config", "schedules", "state_dtype_for",
]
