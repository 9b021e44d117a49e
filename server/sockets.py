"""Sending and receiving one data-plane message on a ZeroMQ socket, for both ends (``ShardLinks``, ``DataServer``).

* ``send_frames(socket, frames)``: one multipart message, a frame at a time. A frame below ``COPY_BELOW`` bytes
  is copied into its ZeroMQ message (cheaper than a zero-copy frame, which pyzmq wraps in a ``Frame`` object
  with a release callback); a larger one is sent without a copy, from the array itself, and optionally
  tracked: the ``MessageTracker`` of EACH such frame is returned (``socket.send_multipart`` returns only the
  last part's), so a caller that must not change a sent buffer waits for all of them.
* ``has_message(socket)``: whether a message can be received now, asked of libzmq by a ``zmq_poll`` with no
  timeout instead of a non-blocking receive that raises ``zmq.Again`` when there is none (pyzmq's
  ``socket.get(zmq.EVENTS)`` asks the same but builds a Python enum per call to look the option up);
* ``recv_frames(socket)``: one multipart message as ``zmq.Frame``s (no copy), each frame saying whether another
  follows (``Frame.more``), where ``recv_multipart`` asks the socket (``RCVMORE``, that enum again) per frame.
"""

from __future__ import annotations

import zmq
from zmq.backend import zmq_poll

COPY_BELOW = 65536  # bytes: smaller frames are copied on send (pyzmq's own zero-copy threshold)
# plain ints: pyzmq's constants are enums, and every operation on one builds a new enum object
SNDMORE, POLLIN = int(zmq.SNDMORE), int(zmq.POLLIN)


def send_frames(socket: zmq.Socket, frames, flags: int = 0, track: bool = False) -> list:
    """Send ``frames`` (bytes or arrays) as one message; the trackers of the large frames when ``track``.
    Raises ``zmq.Again`` (with ``zmq.NOBLOCK``) before any frame left when the peer's queue is full."""
    trackers = []
    flags = int(flags)
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        more = flags if index == last else flags | SNDMORE
        if (frame.nbytes if hasattr(frame, "nbytes") else len(frame)) < COPY_BELOW:
            socket.send(frame, more)
        elif track:
            trackers.append(socket.send(frame, more, copy=False, track=True))
        else:
            socket.send(frame, more, copy=False)
    return trackers


def has_message(socket: zmq.Socket) -> bool:
    return bool(zmq_poll(((socket, POLLIN),), 0))


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list:
    """``flags`` (``zmq.NOBLOCK``) apply to the first frame: the rest of a message arrive with it."""
    frame = socket.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = socket.recv(copy=False)
        frames.append(frame)
    return frames
