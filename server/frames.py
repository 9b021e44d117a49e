"""The frame layer of the data plane: one msgpack header frame plus raw array frames, checked before any buffer
is read (no sockets, no message types: server/protocol.py builds its messages on this).

* ``ArrayFrames`` collects the arrays of a message being encoded: ``ref(array)`` records ``[dtype, shape]`` for the
  header and keeps the array itself as a frame (a view: C order, native byte order; no pack copy). An array
  that lies in the link's shared region (server/shared_regions.py) is not a frame: its entry is
  ``[dtype, shape, offset]``, and the header names the region's token (``rg``).
* ``read_header(frames)`` decodes the header (size-capped, a msgpack map, the protocol version);
  ``read_arrays(header, frames, region_of)`` checks the header's array list against the frames — their number,
  and each frame's length against its declared dtype and shape; an offset entry against the region that
  ``region_of(header)`` gives (none: the entry is refused), its bounds and its alignment — and only then reads
  each as a read-only ``np.frombuffer`` view (no unpack copy).
* ``field``/``array_at`` and the ``is_*`` checks read one header field; anything that does not fit raises
  ``ProtocolError(field, expected)``.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

VERSION = 4  # 2: a push carries the client's low water ("lw"); 3: and how many pushes it holds ("n"); 4: arrays in
# a shared region ([dtype, shape, offset] and "rg"), a read's slot there ("sl")
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 4096
ARRAY_DTYPES = frozenset({"float16", "float32", "float64", "uint16", "int8", "uint8", "int32", "int64"})
DTYPE_OF = {name: np.dtype(name) for name in ARRAY_DTYPES}  # header name -> dtype (looked up per frame)
NAME_OF = {dtype: name for name, dtype in DTYPE_OF.items()}  # native dtype -> header name



class ProtocolError(ValueError):
    """A frame that does not fit the protocol: ``field`` names what is wrong, ``expected`` what was expected."""

    def __init__(self, field: str, expected: str, got: Any = None):
        self.field = field
        self.expected = expected
        got_text = "" if got is None else f", got {_short(got)}"
        super().__init__(f"{field}: expected {expected}{got_text}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ArrayFrames:
    """Collects the array frames of one message; ``ref(array)`` is the index its header entry refers to.
    ``region``: the link's shared region (``SharedRegion``), whose arrays travel as offsets; ``shared``: whether
    any did."""

    def __init__(self, region=None):
        self.specs: list = []
        self.frames: list = []
        self.region = region
        self.shared = False

    def ref(self, array) -> int | None:
        if array is None:
            return None
        if type(array) is not np.ndarray:
            array = np.asarray(array)
        name = NAME_OF.get(array.dtype)
        if name is None:  # frames are native byte order (the header names only the dtype)
            array = array.astype(array.dtype.newbyteorder("="))
            name = array.dtype.name
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        offset = None if self.region is None else self.region.offset_of(array)
        if offset is not None:
            self.specs.append([name, list(array.shape), offset])
            self.shared = True
            return len(self.specs) - 1
        self.specs.append([name, list(array.shape)])
        self.frames.append(array.reshape(-1) if array.ndim != 1 else array)
        return len(self.specs) - 1


def buffer_of(frame) -> memoryview:
    """A frame's bytes: a received ``zmq.Frame``, or bytes / an array (frames built here, tests)."""
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def read_header(frames) -> dict:
    if not frames:
        raise ProtocolError("frames", "at least a header frame", 0)
    raw = buffer_of(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header", f"at most {MAX_HEADER_BYTES} bytes", f"{raw.nbytes} bytes")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                                 max_array_len=1 << 20, max_map_len=1 << 16)
    except Exception as error:  # noqa: BLE001 - any undecodable header is the same rejection
        raise ProtocolError("header", "a msgpack map", f"undecodable bytes ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", "a msgpack map", type(header).__name__)
    if header.get("v") != VERSION:
        raise ProtocolError("version", f"protocol version {VERSION}", header.get("v"))
    return header


def read_arrays(header: dict, frames, region_of=None) -> list:
    """The arrays the header lists, checked (module docstring). ``region_of(header)``: the link's shared region
    as a uint8 array, or None (asked at the first offset entry; without it such an entry is refused)."""
    specs = header.get("a")
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError("a", f"a list of at most {MAX_ARRAYS} [dtype, shape] entries", type(specs).__name__)
    framed = sum(1 for spec in specs if type(spec) is not list or len(spec) != 3)
    if len(frames) - 1 != framed:
        raise ProtocolError("frames", f"{framed} array frame(s) after the header, as the header lists",
                            len(frames) - 1)
    checked = []
    frame = 0
    region = None
    for index, spec in enumerate(specs):
        dtype = shape = None
        if type(spec) is list and len(spec) in (2, 3):
            name, shape = spec[0], spec[1]
            dtype = DTYPE_OF.get(name) if type(name) is str else None
        if dtype is None or type(shape) is not list or len(shape) > 4:
            raise ProtocolError(f"a[{index}]", f"[dtype in {sorted(ARRAY_DTYPES)}, shape of <= 4 sizes]", spec)
        size = 1
        for dimension in shape:
            if type(dimension) is not int or not 0 <= dimension < 1 << 40:
                raise ProtocolError(f"a[{index}]", f"[dtype in {sorted(ARRAY_DTYPES)}, shape of <= 4 sizes]", spec)
            size *= dimension
        if len(spec) == 3:  # in the link's shared region
            if region is None:
                region = None if region_of is None else region_of(header)
                if region is None:
                    raise ProtocolError("rg", f"the token of this connection's shared region (for a[{index}])",
                                        header.get("rg"))
            offset, nbytes = spec[2], size * dtype.itemsize
            if type(offset) is not int or not 0 <= offset <= region.nbytes - nbytes or offset % dtype.itemsize:
                raise ProtocolError(f"a[{index}]", f"an aligned offset of {nbytes} bytes inside the shared region "
                                    f"of {region.nbytes} bytes", offset)
            checked.append((dtype, shape, region[offset:offset + nbytes]))
            continue
        frame += 1
        buffer = buffer_of(frames[frame])
        if buffer.nbytes != size * dtype.itemsize:
            raise ProtocolError(f"a[{index}]", f"{size * dtype.itemsize} bytes for {spec[0]} {tuple(shape)}",
                                f"{buffer.nbytes} bytes")
        checked.append((dtype, shape, buffer))
    out = []  # only now are buffers read
    for dtype, shape, buffer in checked:
        array = buffer.view(dtype) if type(buffer) is np.ndarray else np.frombuffer(buffer, dtype=dtype)
        if not array.flags.aligned:  # a kernel wants aligned elements: copy the rare odd frame
            array = array.copy()
        array.flags.writeable = False  # a received frame is read, never written
        out.append(array if len(shape) == 1 else array.reshape(shape))
    return out


def fields(header: dict, specs) -> list:
    """The values of ``specs`` (``(key, name, check, expected)``, checked in that order); ``ProtocolError``
    naming the first field that does not pass its check."""
    get = header.get
    values = []
    for key, name, check, expected in specs:
        value = get(key)
        if not check(value):
            raise ProtocolError(name, expected, value)
        values.append(value)
    return values


def header_field(header: dict, key: str, name: str, check, expected: str):
    value = header.get(key)
    if not check(value):
        raise ProtocolError(name, expected, value)
    return value


def is_count(value) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


def is_opt_count(value) -> bool:
    return value is None or is_count(value)


def is_opt_str(value) -> bool:
    return value is None or (type(value) is str and len(value) <= 256)


def is_client_id(value) -> bool:
    return type(value) is str and 0 < len(value) <= 256


def is_timeout(value) -> bool:
    return value is None or (type(value) in (int, float) and 0 <= value < 1e9)


def array_at(arrays: list, value, name: str, ndim: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if type(value) is not int or not 0 <= value < len(arrays):
        raise ProtocolError(name, f"an index into the {len(arrays)} array frame(s)", value)
    array = arrays[value]
    if ndim is not None and array.ndim != ndim:
        raise ProtocolError(name, f"a {ndim}-D array", f"shape {array.shape}")
    return array
