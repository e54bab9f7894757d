"""Which clients take part in a round and whether a round counts: pure policies, no Ray.

A client is in a round unless it is still busy with a task from an earlier round (a straggler
that missed its deadline keeps computing; its late result is thrown away, and it rejoins once
free). After the deadline, each dispatched client has reported, died, failed, or is late; the
round counts when at least ``min_clients`` reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from expertmesh.platform.errors import ExpertmeshError


class FederationError(ExpertmeshError):
    """The federation could not finish (a client could not start, a round lost its quorum)."""


class QuorumError(FederationError):
    """Fewer clients than ``min_clients`` reported before the round's deadline."""


@dataclass(kw_only=True, slots=True)
class RoundOutcome:
    server_round: int
    reported: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)  # actor gone: replaced before the next round
    failed: list[str] = field(default_factory=list)  # the task raised
    late: list[str] = field(default_factory=list)  # not back by the deadline
    busy: list[str] = field(default_factory=list)  # still on an earlier round: not dispatched

    @property
    def dropped(self) -> list[str]:
        """Clients configured for the round whose update it does not contain."""
        return sorted([*self.dead, *self.failed, *self.late, *self.busy])


def participants(clients: Sequence[str], busy: Iterable[str]) -> tuple[list[str], list[str]]:
    """(clients to dispatch this round, clients left out because still busy), in config order."""
    busy = set(busy)
    return [c for c in clients if c not in busy], [c for c in clients if c in busy]


def close_round(
    server_round: int,
    *,
    reported: Iterable[str],
    dead: Iterable[str] = (),
    failed: Iterable[str] = (),
    late: Iterable[str] = (),
    busy: Iterable[str] = (),
    min_clients: int,
) -> RoundOutcome:
    """The round's outcome, or :class:`QuorumError` when fewer than ``min_clients`` reported."""
    out = RoundOutcome(
        server_round=server_round,
        reported=sorted(reported),
        dead=sorted(dead),
        failed=sorted(failed),
        late=sorted(late),
        busy=sorted(busy),
    )
    if len(out.reported) < min_clients:
        raise QuorumError(
            f"round {server_round}: {len(out.reported)} of the {min_clients} clients needed "
            f"reported (dead {out.dead}, failed {out.failed}, late {out.late}, busy {out.busy})"
        )
    return out
