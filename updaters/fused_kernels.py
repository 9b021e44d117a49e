"""How a rule registers its one-pass kernels: a ``FusedKernels`` as the rule class's own ``fused`` attribute.

``fused_cpu.py`` and ``fused_gpu.py`` look a rule up by its class (``fused_kernels_of``), never by its name; the
steps to add a rule are in docs/design.md, "Adding an update rule". No numba or cupy here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FusedKernels:
    """A rule's one-pass kernels; a rule class sets ``fused = FusedKernels(...)`` next to its math.

    * ``element(gi, *slots, *kernel_scalars) -> (update, *new_slots)``: the rule for ONE element, a plain Python
      function that numba compiles for the CPU (``fused_cpu.py`` wraps it in the loop that loads, adjusts,
      stores). ``gi`` is the adjusted gradient; one argument per state slot, in ``state_keys`` order (the
      argument names are the slot names the CUDA body uses); then the kernel scalars. It performs the
      reference's operations in the reference's order, uses only its arguments, ``abs`` and ``np.sqrt``, and
      no float literal (a literal is float64 and would widen float32 math: derive constants in
      ``kernel_scalars``). The compiled loop is cached on disk keyed by the element's source.
    * ``cuda``: the same math as CUDA statements for CuPy (``fused_gpu.py``): assigns each slot by its name and
      declares ``compute_t update``; None means no GPU kernel (CuPy arrays take the reference path).
    * ``kernel_scalars(rule_scalars) -> tuple``: the kernels' scalars as Python floats, derived in float64 as
      the reference derives them (default: ``rule_scalars`` unchanged).
    * ``zero_update``: the update is always 0 (NoOp): the kernels only apply weight decay, and skip the pass
      when there is none; ``element`` and ``cuda`` are unused.
    """

    element: Callable | None = None
    cuda: str | None = None
    kernel_scalars: Callable[[tuple], tuple] = tuple
    zero_update: bool = False

    def argument_names(self, slots: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(slot names, kernel scalar names)`` from ``element``'s signature, for a rule with ``slots`` slots."""
        names = tuple(inspect.signature(self.element).parameters)
        return names[1:1 + slots], names[1 + slots:]


def fused_kernels_of(rule: type) -> FusedKernels | None:
    """The ``FusedKernels`` the class ``rule`` itself registers, or None: a subclass does not inherit its
    parent's kernels (its math may differ); it reuses them by saying ``fused = Parent.fused``."""
    return rule.__dict__.get("fused")


def check_fused_kernels(rule: type) -> None:
    """Raise TypeError/ValueError naming the class when its ``fused`` is not a usable ``FusedKernels``."""
    fused = fused_kernels_of(rule)
    if fused is None:
        return
    if not isinstance(fused, FusedKernels):
        raise TypeError(f"{rule.__name__}.fused must be a FusedKernels or None, got {type(fused).__name__}")
    if fused.zero_update:
        return
    if fused.element is None:
        raise ValueError(f"{rule.__name__}.fused: element is required unless zero_update is set")
    names = tuple(inspect.signature(fused.element).parameters)
    if len(names) < 1 + len(rule.state_keys) or names[0] != "gi":
        raise ValueError(f"{rule.__name__}.fused: element must take (gi, <one argument per state slot "
                         f"{list(rule.state_keys)}>, *kernel_scalars), got ({', '.join(names)})")
