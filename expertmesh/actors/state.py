"""The controller's persisted record: one JSON document written atomically via pyarrow.fs."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from pyarrow import fs


class StateStore:
    """Reads and atomically replaces a JSON record at a pyarrow.fs URI or local path."""

    def __init__(self, uri: str) -> None:
        self.fs, self.path = fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)

    def read(self) -> dict[str, Any] | None:
        if self.fs.get_file_info(self.path).type == fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read())

    def write(self, record: dict[str, Any]) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, default=str).encode())
        self.fs.move(tmp, self.path)  # atomic rename on local file systems
