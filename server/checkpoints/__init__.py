"""Checkpoints, in one place: the file format, what a shard saves, what a server saves, what a run saves.

    format.py        the files: msgpack only (never pickle), versioned (``VERSION``), checksummed, written
                     atomically; manifest, shard pointers and blobs; every read treats the bytes as hostile
    storage.py       where the bytes go: a local directory or any pyarrow filesystem (S3, GCS, ...)
    shard.py         what ONE shard saves and restores (its pieces, exactly-once and sync bookkeeping, tables)
    row_records.py   a row table's records: a whole table or the changes since a version, and how they fold
    table_chains.py  incremental row-table checkpoints: a base and its deltas as files beside the shard blob
    server_state.py  what the whole server saves (``ParameterServer.save``/``state_dict``) and restores from
                     (``ParameterServer.restore``/``from_state_dict``): the manifest, parameters by name
    state_dict.py    the whole server as one in-memory map by name (its fields, their checks, msgpack bytes)
    training_run.py  what a ``rayps train --checkpoint-dir`` run keeps (shards, per-epoch server, progress)

Nothing here imports Ray; the handle (server/client.py) and the shard actor (server/shard_actor.py) call it.
"""
