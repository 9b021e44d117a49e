"""The per-row update of a row-sparse table: every touched row takes ONE step of the dense updater with its OWN
iteration count (server/sparse_rows.py) — two paths over the table's ``values (n, dim)`` and ``state (slots, n,
dim)`` arrays, changed in place at ``slots``:

* ``apply_by_count`` (``kernel="reference"``, the contract path): rows grouped by iteration count, one
  ``updater.apply(kernel="reference")`` call per count on a gathered copy;
* ``apply_vectorized`` (``kernel="auto"``): one pass over the touched rows with per-row scalars, columns
  ``(k, 1)`` in the compute dtype, so the math is the same as the float scalars of the reference path.
"""

from __future__ import annotations

import numpy as np

from ..updaters.base import NO_ADJUSTMENTS, StepAdjustments


def adjustments(group, iteration: int, epoch: int) -> StepAdjustments:
    """The group's L1/L2/WeightDecay at ``iteration`` (none without a ``ParamGroup``)."""
    return NO_ADJUSTMENTS if group is None else group.adjustments(iteration, epoch)


def apply_by_count(updater, group, values, state, slots, grads, its, epoch) -> None:
    """The contract path: ``updater.apply(kernel="reference")`` once per distinct iteration count."""
    for count in np.unique(its):
        sel = its == count
        rows = slots[sel]
        params, rows_state = values[rows], state[:, rows]  # contiguous gathered copies
        updater.apply(params, np.ascontiguousarray(grads[sel]), rows_state, int(count), epoch,
                      adjustments=adjustments(group, int(count), epoch), kernel="reference")
        values[rows], state[:, rows] = params, rows_state


def apply_vectorized(updater, group, values, state, slots, grads, its, epoch) -> None:
    """One pass over the touched rows with per-row scalars (``reference_step`` with scalar columns)."""
    counts, inverse = np.unique(its, return_inverse=True)
    compute = state.dtype

    def column(items):  # one value per distinct count -> a float if all equal, else a (k, 1) column
        if all(v == items[0] for v in items):
            return items[0]
        return np.asarray(items, dtype=compute)[inverse][:, None]

    rules = [updater.rule_scalars(int(c), epoch) for c in counts]
    scalars = tuple(column([r[i] for r in rules]) for i in range(len(rules[0])))
    adjust = [adjustments(group, int(c), epoch) for c in counts]
    l1, l2, decay = (column([getattr(a, f) for a in adjust]) for f in ("l1", "l2", "weight_decay"))
    w = values[slots].astype(compute, copy=False)
    g = grads.astype(compute)
    rows_state = state[:, slots]
    if _nonzero(l1):
        g += l1 * np.sign(w)
    if _nonzero(l2):
        g += l2 * w
    update = updater.reference_update(g, rows_state, scalars)
    if _nonzero(decay):
        update = update + decay * w
    w -= update
    values[slots] = w.astype(values.dtype, copy=False)
    state[:, slots] = rows_state


def _nonzero(value) -> bool:
    return isinstance(value, np.ndarray) or value != 0
