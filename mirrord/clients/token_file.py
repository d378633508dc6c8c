"""An upstream's API token kept in the state directory, so that a restart or the next `mirrord once`
reuses it instead of logging in again (PDIS's token, ISPyB's JWT).

The file names the account the token belongs to (`{"account": "<user> at <base url>", "token": "..."}`):
after the configured user or URL changes, the old account's token is not used, since what is filed
with it (a PDIS deposit is public and irreversible) would go to the wrong account. A file of another
account, or of the earlier bare-token format, reads as none; the client logs in and overwrites it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def account(user: str, base_url: str) -> str:
    """Who a token belongs to: the user on that server (a test server's token is not the real one's)."""
    return f"{user} at {base_url}"


class TokenFile:
    """One account's API token on disk: owner-only (0600), replaced atomically, reused across restarts."""

    def __init__(self, path: Path, account: str) -> None:
        self.path = Path(path)
        self.account = account

    def read(self) -> str | None:
        """The stored token if it is this account's, else None (no file, another account, old format)."""
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # none yet, or a bare token of the earlier format
            return None
        if not isinstance(data, dict) or data.get("account") != self.account:
            return None
        token = data.get("token")
        return token if isinstance(token, str) and token else None

    def write(self, token: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # Created 0600 from the first byte: the token is never readable by others, not even briefly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps({"account": self.account, "token": token}) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
