"""Compression on the push path (no Ray): server/transport.py encodes one shard's payload at the client and
decodes it at the shard (``ShardState._receive``). Each mode's decode, the encoded byte counts, the exact
threshold identity with its per-(shard, dtype) residual, partial-push keys, row casts, and hostile encodings
(rejected, state unchanged, clock moved)."""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server import transport
from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import Sgd
from rayps.updaters.groups import as_groups, assign_groups
from rayps.server.compression import EncodedTensor, bf16_bits_to_float32, float32_to_bf16_bits

SHAPES = {"W": (60, 40), "b": (40,), "h": (7,)}
DTYPES = {"W": "float32", "b": "float32", "h": "float64"}


def _layout(num_shards=2):
    groups = as_groups(Sgd(learning_rate=1.0))
    return ParameterLayout.build(SHAPES, DTYPES, num_shards, assign_groups(groups, list(SHAPES))), groups


def _grads(seed=0, scale=1e-2):
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(DTYPES[n]) for n, s in SHAPES.items()}


def _messages(layout, grads, rows=None):
    out = []
    for shard in range(layout.num_shards):
        payload, present = layout.pack(shard, grads)
        out.append((shard, payload, present, None, None if rows is None else rows[shard]))
    return out


def test_none_is_the_identity_and_counts_float_bytes():
    layout, _ = _layout()
    messages = _messages(layout, _grads())
    assert transport.encode_messages(messages, "none", {}) is messages
    for shard, payload, present, _, rows in messages:
        decoded, _, nbytes, problem = transport.decode_push(payload, rows, layout.shard_pieces[shard], present, {})
        assert problem is None and decoded is payload
        assert nbytes == sum(a.nbytes for a in payload.values())


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_casts_halve_the_float32_bytes_and_decode_to_the_parameter_dtype_within_their_precision(mode):
    layout, _ = _layout()
    grads = _grads()
    plain = _messages(layout, grads)
    encoded = transport.encode_messages(_messages(layout, grads), mode, {})
    for (shard, payload, present, _, _), (_, sent, _, _, _) in zip(plain, encoded):
        assert isinstance(sent, transport.EncodedPayload) and sent.mode == mode
        wire = {"fp16": np.float16, "bf16": np.uint16}[mode]
        assert all(a.dtype == wire for a in sent.values())
        assert transport.message_nbytes(sent) == 2 * sum(a.size for a in payload.values())  # 2 B per element
        decoded, _, nbytes, problem = transport.decode_push(sent, None, layout.shard_pieces[shard], present, {})
        assert problem is None and nbytes == transport.message_nbytes(sent)
        for dtype, array in payload.items():
            assert decoded[dtype].dtype == np.dtype(dtype) and decoded[dtype].shape == array.shape
            rtol = 2.0 ** -11 if mode == "fp16" else 2.0 ** -8
            np.testing.assert_allclose(decoded[dtype], array, rtol=rtol, atol=1e-7)
    bits = float32_to_bf16_bits(np.array([1.0, -3.5], np.float32))
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), [1.0, -3.5])


def test_threshold_decode_plus_new_residual_equals_gradient_plus_old_residual_per_shard_and_dtype():
    """Over several pushes, for every shard and dtype: decoded + new residual == payload + old residual, bit for
    bit (clipping is DL4J's deliberate loss of residual mass, so it is off here); one encoder per shard, the
    residual under ``f"{shard}/{dtype}"``."""
    layout, _ = _layout()
    encoders: dict = {}
    for step in range(6):
        grads = _grads(step)
        plain = _messages(layout, grads)
        for shard in range(layout.num_shards):  # DL4J's defaults, clipping off for the identity
            encoders.setdefault(shard, transport.ThresholdEncoder(clip_every=0))
        old = {(s, d): encoders[s].residuals.get(transport.residual_key(s, d, None), np.zeros(a.shape, a.dtype)).copy()
               for s, p, _, _, _ in plain for d, a in p.items()}
        encoded = transport.encode_messages(_messages(layout, grads), "threshold", encoders)
        for (shard, payload, present, _, _), (_, sent, _, _, _) in zip(plain, encoded):
            assert all(isinstance(e, EncodedTensor) for e in sent.values())
            decoded, _, nbytes, problem = transport.decode_push(sent, None, layout.shard_pieces[shard], present, {})
            assert problem is None
            assert nbytes == sum(e.nbytes for e in sent.values()) < transport.message_nbytes(payload)
            for dtype, array in payload.items():
                assert decoded[dtype].dtype == np.dtype(dtype)
                residual = encoders[shard].residuals[f"{shard}/{dtype}"]
                lhs = decoded[dtype] + residual
                rhs = array + old[(shard, dtype)]
                np.testing.assert_array_equal(lhs.view(np.uint8), rhs.view(np.uint8))
    assert set(encoders) == {0, 1}
    assert sorted(encoders[0].residuals) == sorted(f"0/{d}" for d in layout.pack(0, _grads())[0])


def test_threshold_with_dl4j_defaults_sends_a_few_percent_of_the_float_bytes_once_adapted():
    layout, _ = _layout(num_shards=1)
    encoders, plain_bytes, sent_bytes = {}, 0, 0
    for step in range(200):
        ((_, payload, present, _, _),) = _messages(layout, _grads(step))
        ((_, sent, _, _, _),) = transport.encode_messages([(0, payload, present, None, None)], "threshold", encoders)
        if step >= 150:  # tau has adapted to the 1% sparsity target
            plain_bytes += transport.message_nbytes(payload)
            sent_bytes += transport.message_nbytes(sent)
    assert encoders[0].last_sparsity <= 0.02
    assert plain_bytes / sent_bytes > 30, plain_bytes / sent_bytes


def test_a_partial_push_keeps_its_own_residual_key():
    layout, _ = _layout(num_shards=1)
    encoders: dict = {}
    full = _grads()
    partial = {"b": full["b"]}
    transport.encode_messages(_messages(layout, full), "threshold", encoders)
    transport.encode_messages(_messages(layout, partial), "threshold", encoders)  # a different shape: no clash
    keys = sorted(encoders[0].residuals)
    assert "0/float32" in keys and "0/float64" in keys
    assert any(k.startswith("0/float32/") for k in keys)
    assert encoders[0].residuals[next(k for k in keys if k.startswith("0/float32/"))].shape == (40,)


@pytest.mark.parametrize("mode", ["fp16", "bf16", "threshold"])
def test_row_grads_take_the_cast_modes_only_and_decode_to_the_table_dtype(mode):
    ids = np.array([3, 9, 3], dtype=np.int64)
    grads = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    rows = {"emb": (ids, grads)}
    sent = transport.encode_rows(rows, mode)
    table = RowTableShard("emb", 10, 4, "float32", 0, 1, Sgd(learning_rate=0.1))
    decoded = transport.decode_rows(sent, {"emb": table})
    if mode == "threshold":  # no residual per row: rows go as float32
        assert sent is rows and transport.message_nbytes({}, sent) == ids.nbytes + grads.nbytes
    else:
        assert isinstance(sent["emb"][1], transport.CastRows)
        assert transport.message_nbytes({}, sent) == ids.nbytes + grads.nbytes // 2
        assert decoded["emb"][1].dtype == np.float32
        np.testing.assert_allclose(decoded["emb"][1], grads, rtol=2.0 ** -8)
    np.testing.assert_array_equal(decoded["emb"][0], ids)


def test_check_mode_names_the_choices():
    assert transport.check_mode("bf16") == "bf16"
    with pytest.raises(ValueError, match="compression must be one of"):
        transport.check_mode("zip")


# -- through ShardState._receive ---------------------------------------------------------------------------------
def _shard(num_shards=1):
    layout, groups = _layout(num_shards)
    params = {n: np.zeros(s, DTYPES[n]) for n, s in SHAPES.items()}
    return layout, ShardState(0, layout.shard_pieces[0], groups, layout.pack(0, params)[0])


@pytest.mark.parametrize("mode", ["threshold", "fp16", "bf16"])
def test_a_shard_applies_the_decoded_payload_and_counts_encoded_bytes(mode):
    layout, state = _shard()
    grads = _grads(scale=0.5)
    ((_, payload, present, _, _),) = _messages(layout, grads)
    ((_, sent, _, _, _),) = transport.encode_messages(_messages(layout, grads), mode, {})
    expected = transport.decode_payload(sent, layout.shard_pieces[0], present)
    assert state.push("c", 1, 0, sent, present).errors == []
    for dtype, array in state.params.items():  # Sgd lr 1: params = -decoded gradient
        np.testing.assert_array_equal(array, -expected[dtype])
    assert state.counters["bytes_pushed"] == transport.message_nbytes(sent) < transport.message_nbytes(payload)
    assert state.counters["updates_applied"] == 1


def _damaged(layout, how):
    grads = _grads(scale=0.5)
    ((_, sent, _, _, _),) = transport.encode_messages(_messages(layout, grads), "threshold", {})
    e = sent["float32"]
    if how == "shape":
        sent["float32"] = e._replace(shape=(e.size - 1,))
    elif how == "tau":
        sent["float32"] = e._replace(tau=float("nan"))
    elif how == "index":
        if e.indices is not None:
            sent["float32"] = e._replace(indices=np.full_like(e.indices, e.size + 5))
        else:
            sent["float32"] = e._replace(bitmap=e.bitmap[:-1])
    elif how == "dtype-key":
        sent["float16"] = sent.pop("float32")
    elif how == "mode":
        sent.mode = "gzip"
    elif how == "not-encoded":
        sent["float32"] = np.zeros(e.size, np.float32)
    elif how == "cast-size":
        sent = transport.EncodedPayload("fp16", {d: np.zeros(3, np.float16) for d in sent})
    return sent


@pytest.mark.parametrize("how", ["shape", "tau", "index", "dtype-key", "mode", "not-encoded", "cast-size"])
def test_a_malformed_encoding_is_rejected_the_state_is_unchanged_and_the_clock_moves(how):
    layout, state = _shard()
    before = {d: a.copy() for d, a in state.params.items()}
    errors = state.push("c", 1, 0, _damaged(layout, how), None).errors
    assert len(errors) == 1 and "shard 0" in errors[0], errors
    for dtype, array in state.params.items():
        np.testing.assert_array_equal(array, before[dtype])
    assert state.clocks[0] == 1 and state.counters["updates_applied"] == 0
