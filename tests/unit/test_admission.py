"""Admission control's pieces that need no cluster: settings, the published schema, the error
types both transports raise."""

from __future__ import annotations

import json
import pickle

import pytest

from expertmesh.api.app import create_app
from expertmesh.api.deps import ApiSettings, token_digest
from expertmesh.client import HttpError, _error
from expertmesh.platform.errors import ConfigError
from expertmesh.types import Overloaded


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_a_bad_per_token_limit_is_refused_naming_it(limit: object) -> None:
    with pytest.raises(ConfigError, match="max_concurrent_per_token"):
        ApiSettings(token_sha256=token_digest("t"), max_concurrent_per_token=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_schema_documents_429_with_retry_after(path: str) -> None:
    schema = create_app(ApiSettings(token_sha256=token_digest("t"))).openapi()
    answer = schema["paths"][path]["post"]["responses"]["429"]
    assert answer["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_overloaded_crosses_process_boundaries_with_its_retry_after() -> None:
    err = pickle.loads(pickle.dumps(Overloaded("full", retry_after=7)))  # as Ray carries it
    assert isinstance(err, Overloaded) and err.retry_after == 7 and str(err) == "full"


def test_the_http_client_raises_overloaded_for_429() -> None:
    body = json.dumps({"error": {"message": "full", "type": "rate_limit_exceeded"}})
    err = _error(429, body, "12")
    assert isinstance(err, Overloaded) and isinstance(err, HttpError)
    assert err.retry_after == 12 and err.status == 429 and err.message == "full"
    assert not isinstance(_error(503, body, "2"), Overloaded)
