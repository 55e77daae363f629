"""Secrets (API keys) never reach a log, a table or a traceback: their values are replaced.

A server may echo the request's `Authorization` header in an error body, and that body ends up
in an exception message, a retry warning, a stored error column and the job's traceback. Every
such text goes through `redact` first, with the values of the environment variables that hold
secrets: the configured `llm.api_key_env` and any variable named like a key or token.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

# variables whose values are treated as secrets even when no config names them
_SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
# shorter values (e.g. "1", "yes") would blank out ordinary words
MIN_SECRET_LENGTH = 8


def secret_values(names: Iterable[str | None] = ()) -> list[str]:
    """Values of the named variables and of every variable named like a secret, longest first
    (so a key that contains another is replaced whole)."""
    wanted = {n for n in names if n}
    values = {
        value
        for name, value in os.environ.items()
        if (name in wanted or _SECRET_NAME.search(name)) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class RedactingFilter(logging.Filter):
    """Redacts secrets from every record passing through a handler: the formatted message and
    any traceback text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info), self.secrets)
            record.exc_info = None
        return True
