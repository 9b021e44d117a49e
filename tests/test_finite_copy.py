"""``finite_copy`` (the exponent-bit finiteness sweep, alone and fused with a copy) against plain NumPy, no Ray.

* ``all_finite(a)`` equals ``np.isfinite(a).all()`` and ``copy_all_finite(a, out)`` leaves ``out`` bit-equal to
  ``np.copy(a)`` and returns the same answer, for float16/32/64, NaN/+Inf/-Inf at the first, a middle and the last
  element, NaN payloads and signed zeros kept, at sizes below, at and above the sweep and split thresholds,
  on one and several threads;
* arrays the kernels do not take (non-contiguous, cast, integer, 0-d) give NumPy's answers;
* ``PushPlan`` built on it: a large push with a NaN or Inf anywhere in any shard's piece is refused naming the
  first such gradient in ``grads`` order, and with no NaN its payloads equal ``ParameterLayout.pack``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from rayps.server import ParameterLayout, finite_copy, validation
from rayps.server.finite_copy import all_finite, copy_all_finite
from rayps.server.push_plan import PushPlan
from rayps.updaters import Sgd
from rayps.updaters.groups import as_groups

FLOATS = (np.float16, np.float32, np.float64)
BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@pytest.fixture
def small_thresholds(monkeypatch):
    """Kernels and the thread split from a few elements on, so small arrays run every path."""
    monkeypatch.setattr(finite_copy, "SWEEP_FROM", 8)
    monkeypatch.setattr(finite_copy, "SPLIT_FROM", 16)


def _assert_matches_numpy(array, threads):
    expected = bool(np.isfinite(array).all())
    assert all_finite(array, threads) is expected
    out = np.full_like(array, 7)
    assert copy_all_finite(array, out, threads) is expected
    width = array.dtype.itemsize
    np.testing.assert_array_equal(out.view(BITS[width]), np.copy(array).view(BITS[width]), strict=True)


@pytest.mark.usefixtures("small_thresholds")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 31, 100, 1001])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sweeps_equal_numpy_with_nan_or_inf_at_first_middle_and_last(dtype, size, threads):
    rng = np.random.default_rng(size)
    base = (rng.standard_normal(size) * 100).astype(dtype)
    _assert_matches_numpy(base, threads)
    for bad in (np.nan, np.inf, -np.inf):
        for position in {0, size // 2, size - 1}:
            array = base.copy()
            array[position] = bad
            _assert_matches_numpy(array, threads)


@pytest.mark.parametrize("dtype", FLOATS)
def test_real_thresholds_large_arrays_split_over_threads(dtype):
    size = finite_copy.SPLIT_FROM * 2 + 3
    array = np.linspace(-1e3, 1e3, size).astype(dtype)
    for threads in (1, 2):
        _assert_matches_numpy(array, threads)
        for position in (0, size // 2, size // 2 + 1, size - 1):
            bad = array.copy()
            bad[position] = np.nan if position % 2 else -np.inf
            _assert_matches_numpy(bad, threads)


@pytest.mark.usefixtures("small_thresholds")
def test_bits_are_copied_exactly_and_extremes_are_finite():
    for dtype, bits in ((np.float16, [0x7E01, 0xFE00, 0x7C01, 0x8000, 0x7BFF, 0x0001, 0xFBFF]),
                        (np.float32, [0x7FC00001, 0xFFC00000, 0x7F800001, 0x80000000, 0x7F7FFFFF, 0x1, 0xFF7FFFFF]),
                        (np.float64, [0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001,
                                      0x8000000000000000, 0x7FEFFFFFFFFFFFFF, 0x1, 0xFFEFFFFFFFFFFFFF])):
        width = np.dtype(dtype).itemsize
        nans = np.array(bits * 3, BITS[width]).view(dtype)  # NaN payloads (quiet, signalling), -0, max, subnormal
        _assert_matches_numpy(nans, 2)
        finite = np.array(bits[3:] * 5, BITS[width]).view(dtype)  # -0, max, smallest subnormal, -max
        assert all_finite(finite) and copy_all_finite(finite, np.empty_like(finite))


@pytest.mark.usefixtures("small_thresholds")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_arrays_the_kernels_do_not_take_give_numpy_answers():
    strided = np.ones((40, 6), np.float32)[:, ::2]
    strided[5, 1] = np.inf
    assert all_finite(strided) is False
    out = np.zeros((40, 3), np.float32)
    assert copy_all_finite(strided, out) is False and np.array_equal(out, strided)
    wide = np.full(50, 1e300)  # float64 -> float32 (same_kind): the SOURCE is checked, as the client always did
    narrow = np.empty(50, np.float32)
    assert copy_all_finite(wide, narrow) is True and np.array_equal(narrow, wide.astype(np.float32))
    assert all_finite(np.arange(100)) and all_finite(np.array(2.5)) and not all_finite(np.array(np.nan))
    with pytest.raises(ValueError, match="shape"):
        copy_all_finite(np.ones(10), np.ones(11))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size", [1, 7, 256, validation.DOT_UP_TO, validation.DOT_UP_TO + 1])
def test_the_numpy_path_equals_the_elementwise_test_at_and_around_the_dot_product_threshold(dtype, size):
    """``validation.all_finite`` (arrays below the sweep; float32/float64 up to ``DOT_UP_TO`` through x . x
    first), 1-D and 2-D, NaN/+Inf/-Inf at the first, a middle and the last element, against
    ``np.isfinite(a).all()``."""
    base = np.linspace(-3.0, 3.0, size).astype(dtype)
    for array in (base, base.reshape(1, size)):
        assert validation.all_finite(array) is True
        for bad in (np.nan, np.inf, -np.inf):
            for position in {0, size // 2, size - 1}:
                broken = array.copy()
                broken.reshape(-1)[position] = bad
                assert validation.all_finite(broken) is bool(np.isfinite(broken).all()) is False


@pytest.mark.parametrize("dtype,huge", [(np.float32, 1e30), (np.float64, 1e200)])
def test_finite_values_whose_dot_product_overflows_are_finite_and_raise_no_warning_made_an_error(dtype, huge):
    """x . x overflows to +Inf for these finite values: the elementwise test answers, also when warnings are
    errors or NumPy raises on overflow."""
    array = np.array([huge, -huge, 1.0], dtype)
    assert validation.all_finite(array) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validation.all_finite(array) is True
    with np.errstate(over="raise"):
        assert validation.all_finite(array) is True
    assert validation.all_finite(np.array([huge, np.nan], dtype)) is False


def test_the_overflow_of_the_dot_product_shows_no_warning_in_a_process_with_default_filters():
    """pytest sets its own warning filters around each test, so the module's filter is checked in a fresh
    interpreter: huge finite gradients print nothing."""
    code = ("import numpy as np; from rayps.server.validation import all_finite; "
            "print(all_finite(np.array([1e30, 1.0], np.float32)), all_finite(np.array([1e200, 1.0])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"] and done.stderr == ""


SHAPES = {"W": (600, 40), "b": (40,), "h": (9, 30)}
DTYPES = {"W": "float32", "b": "float32", "h": "float64"}


@pytest.mark.usefixtures("small_thresholds")
@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("own", [False, True])
def test_push_plan_refuses_any_nan_naming_the_first_bad_gradient(num_shards, own):
    layout = ParameterLayout.build(SHAPES, DTYPES, num_shards)
    plan = PushPlan(layout, as_groups(Sgd()), {}, "reject", own_payloads=False)
    rng = np.random.default_rng(num_shards)
    grads = {n: rng.standard_normal(s).astype(DTYPES[n]) for n, s in SHAPES.items()}
    for shard, payload, present, _, _ in plan.messages(grads, own=own):
        expected, expected_present = layout.pack(shard, grads)
        assert present == expected_present and set(payload) == set(expected)
        for dtype in expected:
            np.testing.assert_array_equal(payload[dtype], expected[dtype], strict=True)
    for name in ("W", "h"):
        flat_size = int(np.prod(SHAPES[name]))
        for position in (0, flat_size // 2, flat_size - 1):  # W's rows are split over the shards
            bad = {n: g.copy() for n, g in grads.items()}
            bad[name].reshape(-1)[position] = np.nan
            with pytest.raises(ValueError, match=rf"grads\['{name}'\] contains NaN or Inf"):
                plan.messages(bad, own=own)
    both = {n: g.copy() for n, g in grads.items()}
    both["h"][-1, -1] = np.inf  # h's piece may be built first; W comes first in grads
    both["W"][-1, -1] = -np.inf
    with pytest.raises(ValueError, match=r"grads\['W'\] contains NaN or Inf"):
        plan.messages(both, own=own)
    skip = PushPlan(layout, as_groups(Sgd()), {}, "skip", own_payloads=False)
    assert skip.messages(both, own=own) == [(s, None, None, None, None) for s in range(num_shards)]
