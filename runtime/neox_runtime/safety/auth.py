"""API keys from a file (one a line) or a mounted Secret directory (one key per file).

Only SHA-256 digests are kept in memory, and a presented key is compared against every
stored digest with `hmac.compare_digest`, so neither timing nor a memory dump reveals
a key. A key's id (a digest prefix) names it in rate limits and the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(path: Path) -> list[str]:
    """Keys from a file, or from every regular file of a directory (Secret mount; `..data` links skipped)."""
    path = Path(path)
    if path.is_dir():
        texts = [p.read_text() for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    elif path.is_file():
        texts = [path.read_text()]
    else:
        raise ValueError(f"api keys: {path} is neither a file nor a directory")
    keys = [line.strip() for text in texts for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"api keys: {path} holds no key")
    return keys


class KeyStore:
    def __init__(self, keys: list[str]):
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def from_path(cls, path: Path) -> "KeyStore":
        return cls(read_keys(path))

    def identify(self, presented: str | None) -> str | None:
        """The key's id when `presented` is a known key, else None; constant time per stored key."""
        if not presented:
            return None
        d = _digest(presented)
        match = None
        for stored in self._digests:
            if hmac.compare_digest(stored, d):
                match = stored
        return match.hex()[:12] if match is not None else None


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
