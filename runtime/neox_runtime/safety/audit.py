"""Audit log of refused and flagged requests, one JSON object a line (for log shippers).

Records say who (key id, never the key), what (event, reason, matched terms) and where
(endpoint, request id); they hold no prompt or completion text.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("neox.audit")


class AuditLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def record(self, event: str, *, reason: str, key_id: str | None, request_id: str | None = None,
               endpoint: str | None = None, **detail: Any) -> None:
        entry = {"time": time.time(), "event": event, "reason": reason, "key_id": key_id,
                 "request_id": request_id, "endpoint": endpoint, **detail}
        line = json.dumps(entry, sort_keys=True)
        log.info("Audit %s", line)
        if self.path is None:
            return
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")
