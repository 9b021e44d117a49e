"""Run the state invariants after every scenario: ``record_instances(monkeypatch, cls)`` records every
instance of ``cls`` (``ShardState``, ``RowTableShard``) a test builds; the module's autouse fixture calls each
one's ``validate()`` when the test is done, so a scenario that leaves a state broken fails there, naming the
invariant (server/shard_invariants.py)."""

from __future__ import annotations


def record_instances(monkeypatch, cls) -> list:
    """Every instance of ``cls`` whose constructor returns during this test, in order."""
    made = []
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(cls, "__init__", init)
    return made


def validate_all(instances) -> int:
    """``validate()`` each instance; returns how many were checked."""
    for instance in instances:
        instance.validate()
    return len(instances)


def validate_shards(ps) -> int:
    """``ShardActor.validate`` on every shard of ``ps`` (a ``ParameterServer``), after its pushes landed;
    returns how many shards were checked (a broken invariant raises ``InvariantError`` naming it)."""
    import ray  # noqa: PLC0415 - only the Ray tests call this

    ps.flush()
    return sum(ray.get([actor.validate.remote() for actor in ps.shard_actors]))
