"""`expertmesh up` checks every port it will listen on before anything starts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from expertmesh.runtime import DASHBOARD_AGENT_PORT, free_port
from expertmesh.service import UpOptions, check_ports
from expertmesh.types import ClusterError


@pytest.fixture
def agent_port_taken() -> Iterator[None]:
    """A listener on the dashboard agent's port, as another local Ray's agent holds it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DASHBOARD_AGENT_PORT))
            s.listen()
        except OSError:
            pass  # something here holds it already: taken either way
        yield


def opts(**kw) -> UpOptions:
    return UpOptions(model="m", host="127.0.0.1", port=free_port(), **kw)


def test_the_agent_port_is_ray_s() -> None:
    from ray._private import ray_constants

    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == DASHBOARD_AGENT_PORT


def test_a_taken_agent_port_refuses_the_dashboard_by_name(agent_port_taken) -> None:
    with pytest.raises(ClusterError, match=rf"port {DASHBOARD_AGENT_PORT}.*--dashboard-port"):
        check_ports(opts(dashboard_port=free_port()))
    check_ports(opts())  # without the dashboard nothing listens there: no objection


def test_taken_api_and_dashboard_ports_name_their_flags() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ClusterError, match=r"\(--port\)"):
            check_ports(UpOptions(model="m", host="127.0.0.1", port=taken))
        with pytest.raises(ClusterError, match=r"\(--dashboard-port\)"):
            check_ports(opts(dashboard_port=taken))
