r"""Gradient compression on the push path: DL4J's threshold encoding (Strom 2015) and fp16/bf16 transport.

The worker's client encodes, the shard decodes: the codec is part of the wire format, so it lives in server/.

**Threshold encoding** (``ThresholdEncoder``, one per parameter set, one threshold for the whole set like DL4J's
flattened gradient view). Each call, for every array of the set::

    s        = residual + g                     (float32 for float16/float32 grads, float64 for float64)
    sent     = where |s| >= tau: sign(s) * tau  (DL4J: indices where |residual| >= tau get +-tau)
    residual = s - sent

then, as DL4J's ``EncodingHandler`` does: the sparsity ratio ``count(sent) / size`` of the whole set drives
``AdaptiveThresholdAlgorithm`` for the NEXT call (initial 1e-3; ratio < 1e-4: ``tau *= decay``; ratio > 1e-2:
``tau /= decay``; decay ``0.5^(1/20)``), and ``ResidualClippingPostProcessor(5.0, 5)`` clips the residual to
``[-5 tau, 5 tau]`` after encoding when ``iteration > 0 and iteration % 5 == 0`` (iteration counts calls from 0).

Exactness: ``decode(encode(g)) + new residual == g + old residual`` bit for bit, and the encoding step neither
creates nor loses gradient mass (``sent + residual == s`` in real numbers). ``tau`` is DL4J's threshold rounded
to 8 significant bits, so for ``|s| < 2^17 tau`` the subtraction ``s - tau`` is exact in float32 (both are
multiples of ``ulp(s)``) and adding ``tau`` back gives ``s``. Each subtraction is verified (Fast2Sum gives its
rounding error exactly); where it rounded (only possible for ``|s| >= 2^17 tau``, a gradient 10^5 thresholds
large) the element is not sent this time: it stays in the residual whole (``stats["withheld"]``) and the
clipping post-processor brings it down. The clipping itself is
DL4J's deliberate loss of residual mass, so the identity holds per ``encode`` before clipping (tests run
with ``clip_every=0`` for it).

Wire formats per array (``EncodedTensor``): *sparse* ``indices`` (int32, ascending) + ``signs`` (int8, +-1), 5
bytes per sent element; *bitmap* 2 bits per element (``packbits(sent) ++ packbits(negative)``). The smaller is
sent (DL4J switches to its bitmap when more than 1/16 of the elements are sent; its bitmap also carries a
"-tau/2" code that is not reproduced here).

**Casts** (``cast_transport`` / ``restore_transport``): ``fp16`` (``astype``, saturating at +-65504 so a large
finite gradient does not become Inf), ``bf16`` (the upper 16 bits of float32 with round-to-nearest-even, NaN kept
NaN; NumPy has no bfloat16 so it travels as uint16), ``none``.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import numpy as np

COMPRESSIONS = ("none", "threshold", "fp16", "bf16")
TRANSPORT_CASTS = ("none", "fp16", "bf16")
DEFAULT_DECAY = 0.5 ** (1 / 20)
TAU_BITS = 8  # significant bits kept in tau (see the exactness note)
TAU_RANGE = (1e-30, 1e30)  # the threshold is kept inside this range (DL4J does not bound it)
FP16_MAX = float(np.finfo(np.float16).max)


class EncodedTensor(NamedTuple):
    """One array, threshold-encoded. Exactly one of (``indices``, ``signs``) and ``bitmap`` is set."""

    shape: tuple
    tau: float  # a float32 value (8 significant bits)
    indices: np.ndarray | None  # int32, ascending flat indices of the sent elements
    signs: np.ndarray | None  # int8, +1 / -1
    bitmap: np.ndarray | None  # uint8, packbits(sent) followed by packbits(negative)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def count(self) -> int:
        """Elements sent (+-tau)."""
        if self.bitmap is not None:
            return int(np.unpackbits(self.bitmap[:_bitmap_half(self.size)], count=self.size).sum())
        return int(len(self.indices))

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the arrays plus 4 for tau."""
        arrays = (self.bitmap,) if self.bitmap is not None else (self.indices, self.signs)
        return int(sum(a.nbytes for a in arrays)) + 4


def _bitmap_half(size: int) -> int:
    return (size + 7) // 8


def _check_positive(field: str, value, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not 0 < value < upper:
        raise ValueError(f"ThresholdEncoder: {field} must be a finite number in (0, {upper}), got {value!r}")
    return float(value)


def quantize_tau(threshold: float) -> float:
    """``threshold`` clamped to ``TAU_RANGE`` and rounded to ``TAU_BITS`` significant bits (exact in float32)."""
    threshold = min(max(float(threshold), TAU_RANGE[0]), TAU_RANGE[1])
    mantissa, exponent = math.frexp(threshold)
    return float(np.float32(math.ldexp(round(mantissa * (1 << TAU_BITS)) / (1 << TAU_BITS), exponent)))


class ThresholdEncoder:
    """DL4J threshold encoding with residual accumulation, adaptive threshold and residual clipping.

    ``clip_every=0`` disables the clipping post-processor. ``encode`` keeps a residual per key; a key must
    keep its shape from call to call.
    """

    def __init__(self, initial_threshold: float = 1e-3, min_sparsity: float = 1e-4, max_sparsity: float = 1e-2,
                 decay: float = DEFAULT_DECAY, clip_every: int = 5, clip_multiple: float = 5.0):
        self.initial_threshold = _check_positive("initial_threshold", initial_threshold)
        self.min_sparsity = _check_positive("min_sparsity", min_sparsity, 1.0 + 1e-12)
        self.max_sparsity = _check_positive("max_sparsity", max_sparsity, 1.0 + 1e-12)
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"ThresholdEncoder: min_sparsity ({min_sparsity}) must be <= max_sparsity "
                             f"({max_sparsity})")
        if not (isinstance(decay, (int, float)) and 0.5 <= decay < 1.0):  # DL4J's own bounds
            raise ValueError(f"ThresholdEncoder: decay must be in [0.5, 1), got {decay!r}")
        self.decay = float(decay)
        if isinstance(clip_every, bool) or not isinstance(clip_every, int) or clip_every < 0:
            raise ValueError(f"ThresholdEncoder: clip_every must be an integer >= 0 (0: never), got {clip_every!r}")
        if not (isinstance(clip_multiple, (int, float)) and clip_multiple >= 1.0):  # DL4J: >= 1
            raise ValueError(f"ThresholdEncoder: clip_multiple must be >= 1.0, got {clip_multiple!r}")
        self.clip_every, self.clip_multiple = clip_every, float(clip_multiple)
        self.threshold = self.initial_threshold  # DL4J's continuous threshold; tau is its quantized value
        self.iteration = 0
        self.last_sparsity: float | None = None
        self.residuals: dict[str, np.ndarray] = {}
        self.stats = {"encoded": 0, "sent": 0, "elements": 0, "withheld": 0, "clipped": 0}

    @property
    def tau(self) -> float:
        return quantize_tau(self.threshold)

    def _adapt(self) -> None:
        """DL4J ``AdaptiveThresholdAlgorithm.calculateThreshold`` from the previous call's sparsity ratio."""
        if self.last_sparsity is None:
            return
        if self.last_sparsity < self.min_sparsity:
            self.threshold *= self.decay  # too sparse: lower the threshold, send more
        elif self.last_sparsity > self.max_sparsity:
            self.threshold /= self.decay  # too dense: raise it, send less
        self.threshold = min(max(self.threshold, TAU_RANGE[0]), TAU_RANGE[1])

    def encode(self, grads: Mapping[str, np.ndarray]) -> dict[str, EncodedTensor]:
        """Encode one push. Every array is checked (float, finite, same shape as before) before any change."""
        if not isinstance(grads, Mapping) or not grads:
            raise ValueError("ThresholdEncoder.encode: grads must be a non-empty mapping name -> float array")
        for name, g in grads.items():
            if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
                raise ValueError(f"ThresholdEncoder.encode: grads[{name!r}] must be a NumPy float array, "
                                 f"got {getattr(g, 'dtype', type(g).__name__)}")
            if name in self.residuals and self.residuals[name].shape != g.shape:
                raise ValueError(f"ThresholdEncoder.encode: grads[{name!r}] has shape {g.shape}, but this key "
                                 f"had shape {self.residuals[name].shape} (its residual)")
            if not np.isfinite(g).all():
                raise ValueError(f"ThresholdEncoder.encode: grads[{name!r}] contains NaN or Inf")
        self._adapt()
        tau = self.tau
        clip = self.clip_every and self.iteration > 0 and self.iteration % self.clip_every == 0
        out, sent_total, size_total = {}, 0, 0
        for name, g in grads.items():
            dtype = np.float64 if g.dtype == np.float64 else np.float32
            residual = self.residuals.get(name)
            if residual is None:  # starts at +0.0: then s is never -0.0 and the identity holds bit for bit
                residual = np.zeros(g.shape, dtype=dtype)
            s = np.asarray(residual + g.astype(dtype, copy=False))  # (0-d stays an array)
            flat = s.reshape(-1)
            candidates = np.flatnonzero(np.abs(flat) >= dtype(tau))
            values = flat[candidates]
            sent = np.where(values < 0, dtype(-tau), dtype(tau))
            remainder = values - sent
            # Fast2Sum (|values| >= |sent|): the rounding error of values - sent, exactly; 0 <=> no rounding
            exact = (-sent - (remainder - values)) == 0
            if not exact.all():
                self.stats["withheld"] += int((~exact).sum())
                candidates, sent, remainder = candidates[exact], sent[exact], remainder[exact]
            flat[candidates] = remainder
            if clip:
                limit = dtype(self.clip_multiple * tau)
                self.stats["clipped"] += int((np.abs(flat) > limit).sum())
                np.clip(flat, -limit, limit, out=flat)
            self.residuals[name] = s
            out[name] = _pack(tuple(g.shape), tau, candidates, sent < 0)
            sent_total += len(candidates)
            size_total += flat.size
        self.last_sparsity = sent_total / size_total if size_total else 0.0
        self.iteration += 1
        self.stats["encoded"] += 1
        self.stats["sent"] += sent_total
        self.stats["elements"] += size_total
        return out


def _pack(shape: tuple, tau: float, indices: np.ndarray, negative: np.ndarray) -> EncodedTensor:
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 1 << 31:
        raise ValueError(f"threshold encoding: an array of {size} elements does not fit int32 indices")
    if 5 * len(indices) <= 2 * _bitmap_half(size):
        return EncodedTensor(shape, tau, indices.astype(np.int32), np.where(negative, -1, 1).astype(np.int8), None)
    sent_bits = np.zeros(size, dtype=bool)
    sent_bits[indices] = True
    negative_bits = np.zeros(size, dtype=bool)
    negative_bits[indices[negative]] = True
    return EncodedTensor(shape, tau, None, None, np.concatenate([np.packbits(sent_bits), np.packbits(negative_bits)]))


def decode_tensor(encoded: EncodedTensor, shape=None, dtype=np.float32, name: str = "?") -> np.ndarray:
    """A dense array (``dtype``) with +-tau at the sent elements; every field of ``encoded`` is checked
    (a shard treats it as hostile input). ``shape``: the expected shape, when the receiver knows it."""
    where = f"encoded gradient {name!r}"
    if not isinstance(encoded, EncodedTensor):
        raise ValueError(f"{where}: expected an EncodedTensor, got {type(encoded).__name__}")
    got_shape = tuple(encoded.shape)
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in got_shape):
        raise ValueError(f"{where}: shape {got_shape} is not a tuple of non-negative integers")
    if shape is not None and got_shape != tuple(shape):
        raise ValueError(f"{where}: shape {got_shape}, expected {tuple(shape)}")
    tau = encoded.tau
    if not isinstance(tau, float) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{where}: tau must be a finite float > 0, got {tau!r}")
    size = encoded.size
    out = np.zeros(size, dtype=dtype)
    if encoded.bitmap is not None:
        bitmap, half = encoded.bitmap, _bitmap_half(size)
        if encoded.indices is not None or not isinstance(bitmap, np.ndarray) or bitmap.dtype != np.uint8 \
                or bitmap.shape != (2 * half,):
            raise ValueError(f"{where}: bitmap must be uint8 of {2 * half} bytes (and no indices)")
        sent = np.unpackbits(bitmap[:half], count=size).view(bool)
        negative = np.unpackbits(bitmap[half:], count=size).view(bool)
        if (negative & ~sent).any():
            raise ValueError(f"{where}: bitmap marks a sign for an element that is not sent")
        out[sent] = dtype(tau)
        out[negative] = dtype(-tau)
        return out.reshape(got_shape)
    indices, signs = encoded.indices, encoded.signs
    if not (isinstance(indices, np.ndarray) and indices.dtype == np.int32 and indices.ndim == 1):
        raise ValueError(f"{where}: indices must be a 1-D int32 array")
    if not (isinstance(signs, np.ndarray) and signs.dtype == np.int8 and signs.shape == indices.shape):
        raise ValueError(f"{where}: signs must be int8 with one sign per index")
    if len(indices):
        if indices[0] < 0 or indices[-1] >= size or (len(indices) > 1 and (np.diff(indices) <= 0).any()):
            raise ValueError(f"{where}: indices must be ascending, unique and in [0, {size})")
        if not np.isin(signs, (-1, 1)).all():
            raise ValueError(f"{where}: signs must be +1 or -1")
    out[indices] = np.where(signs < 0, dtype(-tau), dtype(tau))
    return out.reshape(got_shape)


def decode(encoded: Mapping[str, EncodedTensor], shapes: Mapping[str, tuple] | None = None,
           dtype=np.float32) -> dict[str, np.ndarray]:
    """Dense arrays from ``ThresholdEncoder.encode``'s output (shapes checked when given)."""
    if not isinstance(encoded, Mapping):
        raise ValueError(f"encoded gradients must be a mapping name -> EncodedTensor, got {type(encoded).__name__}")
    unknown = [] if shapes is None else sorted(set(encoded) - set(shapes))
    if unknown:
        raise ValueError(f"encoded gradients: unknown name(s) {unknown}; expected a subset of {sorted(shapes)}")
    return {name: decode_tensor(e, None if shapes is None else shapes[name], dtype, name)
            for name, e in encoded.items()}


def encoded_nbytes(encoded: Mapping[str, EncodedTensor]) -> int:
    """Bytes on the wire of one encoded push (arrays + 4 bytes of tau per array)."""
    return int(sum(e.nbytes for e in encoded.values()))


# -- fp16 / bf16 transport -----------------------------------------------------------------------------------
def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``x``, rounded to nearest even; NaN stays NaN, overflow gives Inf."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN, sign kept
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def cast_transport(grads: Mapping[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The arrays to send: ``none`` as given, ``fp16`` float16 (saturating), ``bf16`` uint16 bit patterns."""
    if mode not in TRANSPORT_CASTS:
        raise ValueError(f"transport cast must be one of {list(TRANSPORT_CASTS)}, got {mode!r}")
    if mode == "none":
        return dict(grads)
    if mode == "fp16":
        return {name: np.where(np.isfinite(g), np.clip(g, -FP16_MAX, FP16_MAX), g).astype(np.float16)
                for name, g in grads.items()}
    return {name: float32_to_bf16_bits(g) for name, g in grads.items()}


def restore_transport(payload: Mapping[str, np.ndarray], mode: str, dtypes: Mapping[str, str] | None = None
                      ) -> dict[str, np.ndarray]:
    """Float arrays back from ``cast_transport``'s output (``dtypes[name]``, float32 by default)."""
    if mode not in TRANSPORT_CASTS:
        raise ValueError(f"transport cast must be one of {list(TRANSPORT_CASTS)}, got {mode!r}")
    expected = {"none": "f", "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}[mode]
    out = {}
    for name, a in payload.items():
        if not isinstance(a, np.ndarray) or (a.dtype.kind != "f" if mode == "none" else a.dtype != expected):
            raise ValueError(f"{mode} payload[{name!r}]: expected {expected} data, got {getattr(a, 'dtype', a)!r}")
        value = bf16_bits_to_float32(a) if mode == "bf16" else a
        out[name] = value.astype(np.dtype((dtypes or {}).get(name, np.float32)), copy=False)
    return out


def transport_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
