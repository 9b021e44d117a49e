"""DL4J's ``GradientNormalization`` over a named group of parameters (DL4J's "layer").

Each mode reduces to a per-parameter ``(grad_scale, clip_value)`` pair that the kernels apply in the same pass
as the update, so normalization costs one read of the gradient (for the norm) and no temporary array.

* ``None`` (default): unchanged.
* ``RenormalizeL2PerLayer``: ``g /= ||g_layer||_2`` (the norm over every gradient of the group; 1e-5 if it is 0).
* ``RenormalizeL2PerParamType``: the same, with the norm of each parameter alone.
* ``ClipElementWiseAbsoluteValue``: ``g = clip(g, -T, T)``.
* ``ClipL2PerLayer``: if ``||g_layer|| > T``: ``g *= T / ||g_layer||``.
* ``ClipL2PerParamType``: the same per parameter.

Source: ``org.deeplearning4j.nn.conf.GradientNormalization`` and ``BaseMultiLayerUpdater.preApply``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

GRADIENT_NORMALIZATIONS = (
    "None",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
)
ZERO_NORM_REPLACEMENT = 1e-5


def check_gradient_normalization(mode, threshold) -> tuple[str, float]:
    if mode not in GRADIENT_NORMALIZATIONS:
        raise ValueError(f"gradient_normalization must be one of {list(GRADIENT_NORMALIZATIONS)}, got {mode!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"gradient_normalization_threshold must be a number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"gradient_normalization_threshold must be finite and > 0, got {threshold}")
    return mode, threshold


def squared_l2(array) -> float:
    """``sum(g*g)`` accumulated in float64 (one read of the gradient)."""
    flat = array.reshape(-1)
    if flat.dtype == np.float64:
        return float(np.dot(flat, flat))
    return float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))


def normalization_factors(mode: str, threshold: float, grads: Mapping[str, "np.ndarray"],
                          squared_norms: Mapping[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """``name -> (grad_scale, clip_value)`` for the gradients of ONE group.

    ``squared_norms`` may carry precomputed ``sum(g*g)`` per name (a caller that already read the gradient).
    """
    if squared_norms is None and mode not in ("None", "ClipElementWiseAbsoluteValue"):
        squared_norms = {name: squared_l2(g) for name, g in grads.items()}
    if mode == "None":
        return {name: (1.0, math.inf) for name in grads}
    if mode == "ClipElementWiseAbsoluteValue":
        return {name: (1.0, threshold) for name in grads}
    if mode in ("RenormalizeL2PerLayer", "ClipL2PerLayer"):
        norm = math.sqrt(sum(squared_norms[name] for name in grads))
        scale = _scale(mode, threshold, norm)
        return {name: (scale, math.inf) for name in grads}
    return {name: (_scale(mode, threshold, math.sqrt(squared_norms[name])), math.inf) for name in grads}


def _scale(mode: str, threshold: float, norm: float) -> float:
    if mode.startswith("Renormalize"):
        return 1.0 / (norm if norm != 0.0 else ZERO_NORM_REPLACEMENT)
    return threshold / norm if norm > threshold else 1.0
