"""Names and namespace of expertmesh's Ray actors (so every process can find them)."""

NAMESPACE = "expertmesh"
CONTROLLER = "expertmesh-controller"
ROUTER = "expertmesh-router"


_SHARD_PREFIX = "expertmesh-shard-"


def shard_name(shard_id: str) -> str:
    return f"{_SHARD_PREFIX}{shard_id}"


def shard_id_of(name: str) -> str | None:
    """The shard id (``s<N>``) an actor name stands for, or None for any other actor."""
    sid = name.removeprefix(_SHARD_PREFIX)
    return sid if sid != name and sid[:1] == "s" and sid[1:].isdigit() else None
