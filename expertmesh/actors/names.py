"""Names and namespace of expertmesh's Ray actors (so every process can find them)."""

NAMESPACE = "expertmesh"
CONTROLLER = "expertmesh-controller"
ROUTER = "expertmesh-router"


def shard_name(shard_id: str) -> str:
    return f"expertmesh-shard-{shard_id}"
