"""Ray actors: expert shards, the router service and the controller."""
