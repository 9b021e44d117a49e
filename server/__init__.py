"""rayps.server: the parameter store — layout, shard logic, shard actors, and the ParameterServer handle."""

from .delta_tokens import TableDelta
from .layout import ParameterLayout, Piece
from .row_index import HashedUniformInit
from .row_policies import CountAdmission, LFUEviction, LRUEviction, ProbabilityAdmission, TTLEviction
from .row_tables import RowTable
from .shard_state import ShardState
from .validation import CONSISTENCY_MODES, NAN_POLICIES


def __getattr__(name):  # Ray is imported only when the handle or the actor is asked for
    if name == "ParameterServer":
        from .client import ParameterServer

        return ParameterServer
    if name == "ShardActor":
        from .shard_actor import ShardActor

        return ShardActor
    raise AttributeError(name)


__all__ = ["CONSISTENCY_MODES", "CountAdmission", "HashedUniformInit", "LFUEviction", "LRUEviction", "NAN_POLICIES",
           "ParameterLayout", "ParameterServer", "Piece", "ProbabilityAdmission", "RowTable", "ShardActor",
           "ShardState", "TTLEviction", "TableDelta"]
