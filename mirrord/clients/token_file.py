"""An upstream's API token kept in the state directory, so that a restart or the next `mirrord once`
reuses it instead of logging in again (PDIS's token, ISPyB's JWT)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class TokenFile:
    """An API token on disk: owner-only (0600), replaced atomically, reused across restarts and runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> str | None:
        try:
            token = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        return token or None

    def write(self, token: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # Created 0600 from the first byte: the token is never readable by others, not even briefly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
