"""Sending and receiving one data-plane message on a ZeroMQ socket, for both ends (``ShardLinks``, ``DataServer``).

* ``send_frames(socket, frames)``: one multipart message, a frame at a time. A frame below ``COPY_BELOW`` bytes
  is copied into its ZeroMQ message (cheaper than a zero-copy frame, which pyzmq wraps in a ``Frame`` object
  with a release callback); a larger one is sent without a copy, from the array itself, and optionally
  tracked: the ``MessageTracker`` of EACH such frame is returned (``socket.send_multipart`` returns only the
  last part's), so a caller that must not change a sent buffer waits for all of them.
* ``has_message(socket)``: whether a message can be received now, asked of the socket (``ZMQ_EVENTS``)
  instead of a non-blocking receive that raises ``zmq.Again`` when there is none.
"""

from __future__ import annotations

import zmq

COPY_BELOW = 65536  # bytes: smaller frames are copied on send (pyzmq's own zero-copy threshold)
# plain ints: pyzmq's constants are enums, and every operation on one builds a new enum object
SNDMORE, EVENTS, POLLIN = int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)


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
    return bool(socket.get(EVENTS) & POLLIN)
