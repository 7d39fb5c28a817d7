"""Structured log lines: capitalized message, then key=value pairs from `extra`.

kopf and our handlers pass context through `extra=`; this formatter prints it, so a
line names the object it is about and can be parsed without regexes.
"""

from __future__ import annotations

import json
import logging

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if pairs:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in pairs.items())
        return line


def configure(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("kubernetes", "urllib3", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
