"""ParameterLayout (no Ray): deterministic, balanced by bytes, large tensors split by rows, each (dtype, group)
contiguous in its shard's buffer, pack/unpack_into round trips for full and partial key sets, and assemble
(the pull side): copy=True arrays writeable and independent of the received buffers, copy=False arrays
read-only, views where a parameter is one piece.

The balance check holds the layout to references computed here: Graham's list-scheduling bound (a shard's load
is at most the mean load plus the largest piece) and, for small cases, 4/3 of the optimum found by brute force
over every assignment of the same pieces to shards (the LPT guarantee).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rayps.server import ParameterLayout


def _specs(rng, count, allow_scalar=True):
    """Random ``shapes, dtypes`` of ``count`` parameters (0-d, 1-d, 2-d and 3-d; float32 and float64)."""
    shapes, dtypes = {}, {}
    for i in range(count):
        ndim = int(rng.integers(0 if allow_scalar else 1, 4))
        shapes[f"p{i}"] = tuple(int(d) for d in rng.integers(1, 7, size=ndim))
        dtypes[f"p{i}"] = str(np.dtype(rng.choice(["float32", "float64"])))
    return shapes, dtypes


def _arrays(rng, shapes, dtypes):
    return {name: np.asarray(rng.normal(size=shape)).astype(dtypes[name]) for name, shape in shapes.items()}


def _nbytes(shapes, dtypes, name):
    return math.prod(shapes[name]) * np.dtype(dtypes[name]).itemsize


def _piece_bytes(piece):
    return piece.size * np.dtype(piece.dtype).itemsize


def _brute_force_optimum(sizes, num_shards):
    best = math.inf
    for assignment in itertools.product(range(num_shards), repeat=len(sizes)):
        loads = [0] * num_shards
        for size, shard in zip(sizes, assignment):
            loads[shard] += size
        best = min(best, max(loads))
    return best


MIXED_SHAPES = {"W0": (7, 3), "b0": (3,), "scale": (), "W1": (3, 4, 2), "b1": (4,), "big": (30, 2), "t": (1,)}
MIXED_DTYPES = {"W0": "float32", "b0": "float32", "scale": "float64", "W1": "float64", "b1": "float32",
                "big": "float64", "t": "float32"}
MIXED_GROUPS = {"W0": 0, "b0": 0, "scale": 1, "W1": 1, "b1": 1, "big": 2, "t": 0}


def test_same_inputs_give_the_same_layout():
    first = ParameterLayout.build(MIXED_SHAPES, MIXED_DTYPES, 3, MIXED_GROUPS)
    again = ParameterLayout.build(dict(MIXED_SHAPES), dict(MIXED_DTYPES), 3, dict(MIXED_GROUPS))
    assert first.shard_pieces == again.shard_pieces
    assert first.buffer_sizes == again.buffer_sizes
    assert first.describe() == again.describe()


@pytest.mark.parametrize("seed", range(12))
def test_every_element_is_placed_once_and_shards_are_balanced_by_bytes(seed):
    rng = np.random.default_rng(seed)
    num_shards = int(rng.integers(1, 5))
    shapes, dtypes = _specs(rng, int(rng.integers(1, 8)))
    layout = ParameterLayout.build(shapes, dtypes, num_shards)
    total = sum(_nbytes(shapes, dtypes, name) for name in shapes)

    # every row of every parameter is in exactly one piece
    for name, shape in shapes.items():
        pieces = layout.pieces_of[name]
        rows = shape[0] if shape else 1
        covered = [r for p in pieces for r in range(p.row_start, p.row_stop)]
        assert covered == list(range(rows)), name
        assert sum(p.size for p in pieces) == math.prod(shape), name

    loads = [sum(_piece_bytes(p) for p in pieces) for pieces in layout.shard_pieces]
    assert [d["bytes"] for d in layout.describe()] == loads
    assert sum(loads) == total
    sizes = [_piece_bytes(p) for pieces in layout.shard_pieces for p in pieces]
    # greedy least-loaded placement: the fullest shard got its last piece while it was the emptiest one
    assert max(loads) <= total / num_shards + max(sizes)
    if len(sizes) <= 9 and num_shards ** len(sizes) <= 50_000:
        optimum = _brute_force_optimum(sizes, num_shards)
        assert max(loads) <= 4 / 3 * optimum, (loads, optimum)


def test_tensor_larger_than_the_fair_share_is_split_by_rows_across_shards():
    shapes = {"big": (40, 5), "a": (3,), "b": (2, 2), "s": ()}
    dtypes = {"big": "float64", "a": "float32", "b": "float64", "s": "float32"}
    layout = ParameterLayout.build(shapes, dtypes, 3)
    total = sum(_nbytes(shapes, dtypes, n) for n in shapes)
    fair = math.ceil(total / 3)
    pieces = layout.pieces_of["big"]
    assert len(pieces) == math.ceil(_nbytes(shapes, dtypes, "big") / fair) == 3
    assert len({p.shard for p in pieces}) == 3
    assert [(p.row_start, p.row_stop) for p in pieces][0][0] == 0
    for before, after in zip(pieces, pieces[1:]):
        assert before.row_stop == after.row_start  # consecutive row blocks
    assert pieces[-1].row_stop == 40
    row_bytes = 5 * 8
    for piece in pieces:
        assert piece.shape == (piece.row_stop - piece.row_start, 5)
        assert _piece_bytes(piece) <= fair + row_bytes  # near-equal pieces
    for name in ("a", "b", "s"):  # smaller than the fair share: whole
        (piece,) = layout.pieces_of[name]
        assert piece.shape == shapes[name]


def test_one_d_tensor_is_split_by_elements_and_a_scalar_never():
    layout = ParameterLayout.build({"v": (100,), "s": ()}, {"v": "float32", "s": "float64"}, 4)
    pieces = layout.pieces_of["v"]
    assert len(pieces) > 1 and len({p.shard for p in pieces}) == len(pieces)
    assert sum(p.row_stop - p.row_start for p in pieces) == 100
    assert all(len(p.shape) == 1 for p in pieces)
    assert [p.shape for p in layout.pieces_of["s"]] == [()]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 6])
def test_pieces_of_each_dtype_and_group_are_contiguous_in_their_shard(num_shards):
    layout = ParameterLayout.build(MIXED_SHAPES, MIXED_DTYPES, num_shards, MIXED_GROUPS)
    for shard, pieces in enumerate(layout.shard_pieces):
        assert [p.index for p in pieces] == list(range(len(pieces)))
        assert all(p.shard == shard for p in pieces)
        for dtype in {p.dtype for p in pieces}:
            in_buffer = sorted((p for p in pieces if p.dtype == dtype), key=lambda p: p.offset)
            # the dtype buffer is tiled exactly: no gap, no overlap
            assert in_buffer[0].offset == 0
            for before, after in zip(in_buffer, in_buffer[1:]):
                assert after.offset == before.offset + before.size
            assert layout.buffer_sizes[shard][dtype] == in_buffer[-1].offset + in_buffer[-1].size
            # each group is ONE run of that buffer
            groups = [p.group for p in in_buffer]
            runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
            assert len(runs) == len(set(runs)), (shard, dtype, groups)
        for piece in pieces:
            assert piece.group == MIXED_GROUPS[piece.name]
            assert piece.dtype == MIXED_DTYPES[piece.name]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_pack_then_unpack_into_round_trips_every_parameter(num_shards):
    rng = np.random.default_rng(num_shards)
    layout = ParameterLayout.build(MIXED_SHAPES, MIXED_DTYPES, num_shards, MIXED_GROUPS)
    arrays = _arrays(rng, MIXED_SHAPES, MIXED_DTYPES)
    originals = {n: a.copy() for n, a in arrays.items()}
    out = {n: np.full(MIXED_SHAPES[n], np.nan, dtype=MIXED_DTYPES[n]) for n in MIXED_SHAPES}
    for shard in range(num_shards):
        buffers, present = layout.pack(shard, arrays)
        assert present is None  # every piece of the shard: the full push
        assert {d: b.size for d, b in buffers.items()} == layout.buffer_sizes[shard]
        for dtype, buffer in buffers.items():
            assert buffer.dtype == np.dtype(dtype) and buffer.ndim == 1
        layout.unpack_into(shard, buffers, out)
    for name, array in arrays.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape
        np.testing.assert_array_equal(out[name], array, err_msg=name)
        np.testing.assert_array_equal(array, originals[name])  # pack never writes its input


@pytest.mark.parametrize("subset", [("W0",), ("scale",), ("big", "t"), ("b0", "W1", "scale"), ("big",)])
@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_pack_then_unpack_into_round_trips_a_partial_key_set(subset, num_shards):
    rng = np.random.default_rng(7)
    layout = ParameterLayout.build(MIXED_SHAPES, MIXED_DTYPES, num_shards, MIXED_GROUPS)
    arrays = {n: a for n, a in _arrays(rng, MIXED_SHAPES, MIXED_DTYPES).items() if n in subset}
    out = {n: np.full(MIXED_SHAPES[n], np.nan, dtype=MIXED_DTYPES[n]) for n in subset}
    for shard in range(num_shards):
        buffers, present = layout.pack(shard, arrays)
        pieces = layout.shard_pieces[shard]
        wanted = [p.index for p in pieces if p.name in subset]
        if len(wanted) == len(pieces):
            assert present is None
        else:
            assert present == wanted
        expected_sizes = {}
        for index in wanted:
            expected_sizes[pieces[index].dtype] = expected_sizes.get(pieces[index].dtype, 0) + pieces[index].size
        assert {d: b.size for d, b in buffers.items()} == expected_sizes
        layout.unpack_into(shard, buffers, out, present)
    assert set(out) == set(subset)
    for name in subset:
        np.testing.assert_array_equal(out[name], arrays[name], err_msg=name)


def test_pack_reads_non_contiguous_sources_and_unpack_ignores_names_not_asked_for():
    layout = ParameterLayout.build(MIXED_SHAPES, MIXED_DTYPES, 3, MIXED_GROUPS)
    rng = np.random.default_rng(3)
    arrays = _arrays(rng, MIXED_SHAPES, MIXED_DTYPES)
    strided = dict(arrays)
    strided["big"] = np.asfortranarray(arrays["big"])
    strided["W0"] = np.ascontiguousarray(arrays["W0"].T).T  # a transposed view with the right shape
    assert not strided["W0"].flags.c_contiguous
    out = {"W0": np.zeros((7, 3), np.float32), "big": np.zeros((30, 2))}
    for shard in range(3):
        buffers, present = layout.pack(shard, strided)
        layout.unpack_into(shard, buffers, out, present)
    np.testing.assert_array_equal(out["W0"], arrays["W0"])
    np.testing.assert_array_equal(out["big"], arrays["big"])


# -- assemble: the pull side of the client (copy=True / copy=False) ----------------------------------------------

ASSEMBLE_SHAPES = {"W": (40, 5), "b": (5,), "h": (7,), "s": (), "m": (3, 2)}
ASSEMBLE_DTYPES = {"W": "float32", "b": "float32", "h": "float64", "s": "float64", "m": "float32"}


def _arrays_of(seed):
    rng = np.random.default_rng(seed)
    return {n: np.asarray(rng.standard_normal(s)).astype(ASSEMBLE_DTYPES[n]) for n, s in ASSEMBLE_SHAPES.items()}


def _received(layout, params, read_only=True):
    """What the shards would send for a whole pull: their flat buffers (read-only, like Ray's)."""
    received = {}
    for shard in range(layout.num_shards):
        buffers, _ = layout.pack(shard, params)
        for array in buffers.values():
            array.flags.writeable = not read_only
        received[shard] = buffers
    return received


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_assemble_copy_true_gives_writeable_independent_arrays(num_shards):
    layout = ParameterLayout.build(ASSEMBLE_SHAPES, ASSEMBLE_DTYPES, num_shards)
    params = _arrays_of(5)
    received = _received(layout, params)
    out = layout.assemble(received, layout.names, copy=True)
    for name, array in out.items():
        np.testing.assert_array_equal(array, params[name], strict=True)
        assert array.flags.writeable
        assert not any(np.shares_memory(array, b) for buffers in received.values() for b in buffers.values())


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("read_only", [True, False])
def test_assemble_copy_false_gives_read_only_arrays_viewing_single_pieces(num_shards, read_only):
    layout = ParameterLayout.build(ASSEMBLE_SHAPES, ASSEMBLE_DTYPES, num_shards)
    params = _arrays_of(6)
    received = _received(layout, params, read_only)
    out = layout.assemble(received, layout.names, copy=False)
    for name, array in out.items():
        np.testing.assert_array_equal(array, params[name], strict=True)
        assert not array.flags.writeable, name
        pieces = layout.pieces_of[name]
        viewing = any(np.shares_memory(array, b) for buffers in received.values() for b in buffers.values())
        assert viewing is (len(pieces) == 1), name
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    for buffers in received.values():  # the received buffers themselves keep their flags
        assert all(b.flags.writeable is (not read_only) for b in buffers.values())


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("copy", [True, False])
def test_assemble_of_a_partial_pull_reads_pieces_packed_in_order(num_shards, copy):
    layout = ParameterLayout.build(ASSEMBLE_SHAPES, ASSEMBLE_DTYPES, num_shards)
    params = _arrays_of(7)
    wanted = ["m", "W", "s"]
    packed, received = {}, {}
    for shard in layout.shards_of(wanted):
        pieces = [p.index for p in layout.shard_pieces[shard] if p.name in wanted]
        packed[shard] = pieces
        received[shard] = layout.pack(shard, {n: params[n] for n in wanted})[0]
    out = layout.assemble(received, wanted, copy, packed)
    assert list(out) == wanted
    for name in wanted:
        np.testing.assert_array_equal(out[name], params[name], strict=True)
        assert out[name].flags.writeable is copy
