"""``SharedMemoryLinks``: the part of ``ShardLinks`` (server/shard_links.py) that uses shared memory with a shard
on the client's node (server/shared_regions.py), split out by concept.

* ``_map_regions``: on an ``ipc://`` connection to a shard whose parameters are large, ask it (through Ray) for
  the link's regions and map them (``LinkRegions``); None where it offers none or they do not map.
* ``_down_slot``: the down slot a whole-parameter read names (one that no waiting read names and no live reply
  uses), set on the request.
* ``_reply_region``: the region a reply's arrays lie in, leased for the slot of the request it answers, for
  ``protocol.from_frames``.
* ``drop_regions``: the shard no longer knows this link's regions (it rejected a message with field ``rg``):
  stop using them and resend what is outstanding over the socket.
"""

from __future__ import annotations

import logging

import ray

from .protocol import PullRequest, PushMessage
from .shared_regions import LinkRegions

log = logging.getLogger(__name__)


class SharedMemoryLinks:
    """A mixin of ``ShardLinks``: it works on the links' fields (``links``, ``pending``, ``actors``, ...)."""

    def _map_regions(self, shard: int) -> LinkRegions | None:
        """The shared regions with ``shard`` (on this node), or None where it offers none or they do not map."""
        wire = self._ask_actor(shard, lambda: ray.get(self.actors[shard].shared_regions.remote(self.client_id),
                                                      timeout=30))
        if wire is None:
            return None
        try:
            return LinkRegions(wire)
        except (OSError, ValueError, KeyError) as error:
            log.warning("rayps data plane: shard %d's shared memory did not map (%s); this link uses its socket",
                        shard, error)
            return None

    def drop_regions(self, shard: int) -> None:
        """Stop using shared memory with ``shard`` and resend what is outstanding over the socket (the shard
        no longer knows the regions)."""
        self.links[shard].regions = None
        self._resend(shard)

    def _down_slot(self, shard: int, message) -> int | None:
        """A free down slot for the reply to ``message`` (a whole-parameter read on a link with shared memory),
        also set on the message; else None."""
        regions = self.links[shard].regions
        if regions is None or (isinstance(message, PullRequest) and message.pieces is not None) or not isinstance(
                message, (PullRequest, PushMessage)):
            return None
        waiting = {entry.slot for entry in self.pending.values() if entry.shard == shard and entry.slot is not None}
        message.slot = regions.free_down_slot(waiting)
        return message.slot

    def _reply_region(self, shard: int, header: dict):
        """The down region a reply's arrays lie in (``from_frames``' ``region_of``), leased for the slot of the
        request it answers; None when its token is not this link's."""
        regions = self.links[shard].regions
        if regions is None or header.get("rg") != regions.token:
            return None
        entry = self.pending.get(header.get("r"))
        if entry is None or entry.shard != shard or entry.slot is None:
            return regions.down.array  # an answer nobody waits for any more: dropped unread
        return regions.lease_down(entry.slot)
