"""Ray-job entrypoints: each ``python -m expertmesh.pipelines.NAME`` parses its config and calls one function."""
