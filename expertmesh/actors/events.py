"""The controller's event log: append-only, persisted, bounded in size, paged by ``seq``.

Every event gets a ``seq`` one higher than the last, also across controller restarts: the log
is written down before :meth:`EventLog.append` returns, and a restarted controller reads it
back and carries on numbering.

On storage (any pyarrow.fs URI, an object store included) the log is a folder of JSON-lines
segments ``seg-<first seq>.jsonl`` of at most ``segment_events`` events each. An event rewrites
only the open segment (atomically: a temporary file, then a rename), never a big file; a full
segment is closed and a new one opened, and only the newest ``keep_segments`` are kept, so the
log holds at most ``segment_events * keep_segments`` events. The folder is per Ray session (as
the controller's record is): a new cluster starts a new log and removes the old sessions' ones.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

from pyarrow import fs

log = logging.getLogger(__name__)

MAX_PAGE = 1000  # most events one page (GET /api/events) carries


class EventLog:
    """The events of one Ray session under ``root`` (a folder on ``filesystem``).

    Args:
        filesystem: where the log lives (the controller record's file system).
        root: the folder holding one sub-folder per session.
        session: the Ray session; other sessions' folders are removed.
        segment_events: events per segment (what one append rewrites, at most).
        keep_segments: segments kept; older ones are deleted.
    """

    def __init__(
        self,
        filesystem: fs.FileSystem,
        root: str,
        session: str,
        *,
        segment_events: int = 100,
        keep_segments: int = 40,
    ) -> None:
        self.fs = filesystem
        self.dir = f"{root}/{session}"
        self.segment_events = segment_events
        self.keep_segments = keep_segments
        self.lock = threading.Lock()
        self.events: deque[dict[str, Any]] = deque(maxlen=segment_events * keep_segments)
        self.next_seq = 1
        self._open: list[str] = []  # the open segment's lines
        self._open_first = 1  # its first event's seq (its name)
        self.fs.create_dir(self.dir, recursive=True)
        self._remove_other_sessions(root, session)
        self._load()

    # ------------------------------------------------------------------ storage
    def _segments(self) -> list[str]:
        infos = self.fs.get_file_info(fs.FileSelector(self.dir, allow_not_found=True))
        names = [i.path for i in infos if i.base_name.startswith("seg-")]
        return sorted(n for n in names if n.endswith(".jsonl"))

    def _remove_other_sessions(self, root: str, session: str) -> None:
        for info in self.fs.get_file_info(fs.FileSelector(root, allow_not_found=True)):
            if info.type == fs.FileType.Directory and info.base_name != session:
                with contextlib.suppress(OSError):  # another process removed it first
                    self.fs.delete_dir(info.path)

    def _load(self) -> None:
        for path in self._segments():
            with self.fs.open_input_stream(path) as f:
                lines = [ln for ln in f.read().decode().splitlines() if ln.strip()]
            self.events.extend(json.loads(ln) for ln in lines)
            self._open, self._open_first = lines, int(path.rsplit("seg-", 1)[1].split(".")[0])
        if self.events:
            self.next_seq = self.events[-1]["seq"] + 1
        if len(self._open) >= self.segment_events or not self._open:
            self._open, self._open_first = [], self.next_seq

    def _segment_path(self, first: int) -> str:
        return f"{self.dir}/seg-{first:012d}.jsonl"

    def _write_open(self) -> None:
        path = self._segment_path(self._open_first)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(("\n".join(self._open) + "\n").encode())
        self.fs.move(tmp, path)  # atomic rename on local file systems

    def _close_open(self) -> None:
        self._open, self._open_first = [], self.next_seq
        closed = self._segments()  # the new open segment has no file yet, and counts too
        for old in closed[: max(0, len(closed) - self.keep_segments + 1)]:
            with contextlib.suppress(OSError):
                self.fs.delete_file(old)

    # ------------------------------------------------------------------ public
    def append(self, kind: str, message: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Record an event; returns it with its ``seq`` and ``ts``. A failed write is logged
        and the event kept in memory: the controller goes on (its record is what matters)."""
        with self.lock:
            ev = {"seq": self.next_seq, "ts": time.time(), "kind": kind, "message": message}
            ev.update(fields)
            self.next_seq += 1
            self.events.append(ev)
            self._open.append(json.dumps(ev, default=str))
            try:
                self._write_open()
            except OSError:
                log.exception("writing event %s to %s failed", ev["seq"], self.dir)
            if len(self._open) >= self.segment_events:
                self._close_open()
        return ev

    def page(self, *, after_seq: int = 0, limit: int = MAX_PAGE, since: float = 0.0) -> dict:
        """Events with ``seq > after_seq`` (and ``ts > since``), oldest first, at most ``limit``.

        ``next`` is the ``after_seq`` for the following page (the last event looked at);
        ``has_more`` whether that page has events already; ``first_seq`` the oldest event still
        kept and ``last_seq`` the newest (a client whose cursor is past it saw another session).
        """
        limit = max(1, min(limit, MAX_PAGE))
        with self.lock:
            first = self.events[0]["seq"] if self.events else self.next_seq
            last = self.next_seq - 1
            start = min(len(self.events), max(0, after_seq + 1 - first))
            tail = list(itertools.islice(self.events, start, None))
        out: list[dict[str, Any]] = []
        cursor, more = after_seq, False
        for ev in tail:
            if ev["ts"] <= since:
                cursor = ev["seq"]
                continue
            if len(out) == limit:
                more = True
                break
            out.append(ev)
            cursor = ev["seq"]
        return {
            "events": out,
            "next": cursor,
            "has_more": more,
            "first_seq": first,
            "last_seq": last,
        }
