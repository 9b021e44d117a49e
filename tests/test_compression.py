"""Worker-side compression (no Ray): DL4J threshold encoding with residuals, its adaptive threshold and residual
clipping, the two wire formats, hostile encoded input, and fp16/bf16 transport casts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayps.server.compression import (DEFAULT_DECAY, EncodedTensor, ThresholdEncoder, bf16_bits_to_float32,
                                      cast_transport, decode, decode_tensor, encoded_nbytes,
                                      float32_to_bf16_bits, quantize_tau, restore_transport, transport_nbytes)

SHAPES = {"W": (40, 25), "b": (25,), "s": ()}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _identity_holds(encoder, grads):
    """decode(encode(g)) + new residual == g + old residual, bit for bit, for every array."""
    old = {k: encoder.residuals.get(k, np.zeros(g.shape, encoder_dtype(g))).copy() for k, g in grads.items()}
    encoded = encoder.encode(grads)
    decoded = decode(encoded, {k: g.shape for k, g in grads.items()}, dtype=np.float32)
    for name, g in grads.items():
        dtype = encoder_dtype(g)
        lhs = np.asarray(decoded[name].astype(dtype) + encoder.residuals[name])
        rhs = np.asarray(g.astype(dtype) + old[name])
        np.testing.assert_array_equal(_bits(lhs), _bits(rhs), err_msg=name)
    return encoded


def encoder_dtype(g):
    return np.float64 if g.dtype == np.float64 else np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_decode_plus_new_residual_equals_gradient_plus_old_residual_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    encoder = ThresholdEncoder(clip_every=0)
    sent = 0
    for _ in range(300):
        scale = 10.0 ** rng.uniform(-6, 1)  # from far below tau to far above it
        grads = {k: np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for k, s in SHAPES.items()}
        encoded = _identity_holds(encoder, grads)
        sent += sum(e.count for e in encoded.values())
    assert sent > 1000 and encoder.iteration == 300


def test_the_identity_holds_for_gradients_far_above_tau_by_withholding_them():
    encoder = ThresholdEncoder(initial_threshold=1e-3, clip_every=0)
    g = np.array([3e4, -7e5, 1e-2, 0.0, 2e-3, 123.456789], dtype=np.float32)  # the first two are >= 2^17 tau
    for _ in range(3):
        encoded = _identity_holds(encoder, {"g": g})
    assert encoder.stats["withheld"] > 0
    tau = encoded["g"].tau
    assert encoded["g"].count >= 2 and set(np.abs(decode(encoded)["g"][2:]).tolist()) <= {0.0, tau}


def test_tau_keeps_eight_significant_bits_of_the_dl4j_threshold():
    for threshold in (1e-3, 0.5 ** (1 / 20) * 1e-3, 3.3e-7, 12.0, 1e-30):
        tau = quantize_tau(threshold)
        mantissa, _ = math.frexp(tau)
        assert (mantissa * 256).is_integer() and float(np.float32(tau)) == tau
        assert abs(tau - threshold) <= threshold * 2 ** -8
    assert ThresholdEncoder().tau == quantize_tau(1e-3)


def test_adaptive_threshold_moves_the_way_dl4j_moves_it():
    tiny = {"g": np.full(10_000, 1e-9, dtype=np.float32)}  # nothing reaches tau: sparsity 0 < 1e-4
    encoder = ThresholdEncoder(clip_every=0)
    for step in range(5):
        encoder.encode(tiny)
        assert encoder.threshold == pytest.approx(1e-3 * DEFAULT_DECAY ** step)  # first call: the initial value
    dense = {"g": np.ones(10_000, dtype=np.float32)}  # everything is sent: sparsity 1 > 1e-2
    encoder = ThresholdEncoder(clip_every=0)
    for step in range(5):
        encoder.encode(dense)
        assert encoder.threshold == pytest.approx(1e-3 / DEFAULT_DECAY ** step)
    assert 1e-3 / DEFAULT_DECAY ** 20 == pytest.approx(2e-3)  # a factor 2 in 20 iterations
    within = np.zeros(10_000, dtype=np.float32)
    within[:50] = 1.0  # 0.5% sent each time: inside [1e-4, 1e-2], the threshold stays
    encoder = ThresholdEncoder(clip_every=0)
    for _ in range(5):
        encoder.encode({"g": within})
        assert encoder.threshold == 1e-3 and encoder.last_sparsity == 0.005


def test_residual_clipping_every_five_iterations_to_five_tau():
    encoder = ThresholdEncoder()  # ResidualClippingPostProcessor(5.0, 5)
    g = {"g": np.linspace(-1.0, 1.0, 101).astype(np.float32)}
    for iteration in range(11):
        encoded = encoder.encode(g)
        largest = np.abs(encoder.residuals["g"]).max()
        limit = np.float32(5.0 * encoded["g"].tau)
        if iteration in (5, 10):
            assert largest <= limit
        else:
            assert largest > limit  # the residual keeps piling up between clips
    assert encoder.stats["clipped"] > 0


def test_sparse_and_bitmap_formats_and_their_byte_counts():
    encoder = ThresholdEncoder(clip_every=0)
    few = np.zeros(1000, dtype=np.float32)
    few[[3, 500, 999]] = [1.0, -1.0, 0.5]
    many = np.where(np.arange(1000) % 2 == 0, 1.0, -1.0).astype(np.float32)
    encoded = encoder.encode({"few": few, "many": many.reshape(10, 100)})
    sparse, bitmap = encoded["few"], encoded["many"]
    assert sparse.bitmap is None and sparse.indices.dtype == np.int32 and sparse.signs.dtype == np.int8
    np.testing.assert_array_equal(sparse.indices, [3, 500, 999])
    np.testing.assert_array_equal(sparse.signs, [1, -1, 1])
    assert sparse.nbytes == 3 * 5 + 4
    assert bitmap.indices is None and bitmap.bitmap.dtype == np.uint8 and bitmap.nbytes == 2 * 125 + 4
    assert bitmap.count == 1000 and encoded_nbytes(encoded) == 19 + 254
    tau = np.float32(sparse.tau)
    decoded = decode(encoded)
    np.testing.assert_array_equal(decoded["few"][[3, 500, 999]], [tau, -tau, tau])
    assert np.count_nonzero(decoded["few"]) == 3
    np.testing.assert_array_equal(decoded["many"], np.sign(many).reshape(10, 100) * tau)


def _sparse(indices, signs, size=10, tau=1e-3):
    return EncodedTensor((size,), tau, np.asarray(indices, np.int32), np.asarray(signs, np.int8), None)


@pytest.mark.parametrize("encoded, message", [
    (_sparse([1, 10], [1, 1]), "ascending, unique and in"),
    (_sparse([-1, 2], [1, 1]), "ascending, unique and in"),
    (_sparse([4, 2], [1, 1]), "ascending, unique and in"),
    (_sparse([2, 2], [1, 1]), "ascending, unique and in"),
    (_sparse([1, 2], [1, 0]), r"\+1 or -1"),
    (_sparse([1, 2], [1]), "one sign per index"),
    (EncodedTensor((10,), 1e-3, np.array([1], np.int64), np.array([1], np.int8), None), "1-D int32"),
    (_sparse([1], [1], tau=-1.0), "finite float > 0"),
    (_sparse([1], [1], tau=float("nan")), "finite float > 0"),
    (EncodedTensor((10,), 1e-3, None, None, np.zeros(3, np.uint8)), "uint8 of 4 bytes"),
    (EncodedTensor((10,), 1e-3, None, None, np.array([0, 0, 1, 0], np.uint8)), "not sent"),
    (EncodedTensor((-1,), 1e-3, None, None, np.zeros(0, np.uint8)), "non-negative integers"),
    ("not encoded", "expected an EncodedTensor"),
])
def test_decode_refuses_hostile_encodings(encoded, message):
    with pytest.raises(ValueError, match=r"encoded gradient 'x': .*" + message):
        decode_tensor(encoded, name="x")


def test_decode_checks_the_expected_shape():
    with pytest.raises(ValueError, match=r"shape \(10,\), expected \(2, 5\)"):
        decode({"x": _sparse([1], [1])}, {"x": (2, 5)})
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['y'\]"):
        decode({"y": _sparse([1], [1])}, {"x": (10,)})


def test_encode_refuses_bad_gradients_and_changes_nothing():
    encoder = ThresholdEncoder(clip_every=0)
    encoder.encode({"W": np.ones((2, 3), np.float32)})
    residual, threshold = encoder.residuals["W"].copy(), encoder.threshold
    bad = [({"W": np.array([[1, np.nan, 1], [1, 1, 1]], np.float32)}, "NaN or Inf"),
           ({"W": np.ones((3, 2), np.float32)}, r"shape \(3, 2\), but this key had shape \(2, 3\)"),
           ({"W": np.ones((2, 3), np.int32)}, "float array"),
           ({}, "non-empty mapping")]
    for grads, message in bad:
        with pytest.raises(ValueError, match=message):
            encoder.encode(grads)
    np.testing.assert_array_equal(encoder.residuals["W"], residual)
    assert encoder.threshold == threshold and encoder.iteration == 1
    for kwargs in ({"initial_threshold": 0}, {"min_sparsity": 0.1, "max_sparsity": 0.01}, {"decay": 0.4},
                   {"clip_every": -1}, {"clip_multiple": 0.5}):
        with pytest.raises(ValueError, match="ThresholdEncoder"):
            ThresholdEncoder(**kwargs)


# -- fp16 / bf16 ---------------------------------------------------------------------------------------------
def test_fp16_and_bf16_round_trips_stay_within_their_rounding_error_at_half_the_bytes():
    rng = np.random.default_rng(4)
    g = {"W": (rng.standard_normal((64, 32)) * 10.0 ** rng.uniform(-4, 4, (64, 32))).astype(np.float32)}
    assert transport_nbytes(cast_transport(g, "none")) == g["W"].nbytes
    bounds = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}  # half an ulp, relative (normal range)
    for mode, bound in bounds.items():
        payload = cast_transport(g, mode)
        assert transport_nbytes(payload) == g["W"].nbytes // 2
        back = restore_transport(payload, mode)["W"]
        assert back.dtype == np.float32
        magnitude = np.abs(g["W"])
        normal = (magnitude >= 6.2e-5) & (magnitude <= 65504) if mode == "fp16" else magnitude >= 1.2e-38
        relative = np.abs(back - g["W"])[normal] / np.abs(g["W"])[normal]
        assert relative.max() <= bound
    restored64 = restore_transport(cast_transport(g, "fp16"), "fp16", {"W": "float64"})["W"]
    assert restored64.dtype == np.float64


def test_bf16_rounds_to_nearest_even_and_keeps_specials():
    values = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -0.0, np.inf, -np.inf, np.nan,
                       np.finfo(np.float32).max, 1e-40], dtype=np.float32)
    back = bf16_bits_to_float32(float32_to_bf16_bits(values))
    assert back[0] == 1.0 and back[1] == 1.0 + 4 * 2 ** -8 and back[2] == 1.0 + 2 ** -7  # ties to even; above
    assert np.signbit(back[3]) and back[3] == 0.0
    assert back[4] == np.inf and back[5] == -np.inf and np.isnan(back[6])
    assert back[7] == np.inf  # float32's max lies above bf16's largest finite + half an ulp
    assert abs(back[8] - values[8]) <= 2.0 ** -133  # subnormals keep float32's absolute resolution
    payload = np.array([0x7F81], dtype=np.uint16)  # a NaN pattern whose low bits alone are set stays NaN
    assert np.isnan(bf16_bits_to_float32(payload))[0]
    nan_low_bits = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(nan_low_bits)))[0]


def test_fp16_saturates_finite_values_and_keeps_non_finite_ones():
    g = {"x": np.array([1e6, -1e6, np.inf, np.nan, 1.0], dtype=np.float32)}
    back = restore_transport(cast_transport(g, "fp16"), "fp16")["x"]
    assert back[0] == 65504.0 and back[1] == -65504.0 and back[2] == np.inf and np.isnan(back[3]) and back[4] == 1.0


def test_transport_modes_and_payload_types_are_checked():
    with pytest.raises(ValueError, match="transport cast must be one of"):
        cast_transport({}, "int8")
    with pytest.raises(ValueError, match=r"bf16 payload\['W'\]: expected uint16"):
        restore_transport({"W": np.zeros(3, np.float16)}, "bf16")
    with pytest.raises(ValueError, match=r"fp16 payload\['W'\]: expected float16"):
        restore_transport({"W": np.zeros(3, np.float32)}, "fp16")
