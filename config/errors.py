"""``ConfigError``, and ``Problems``, through which the section classes raise it: every
section module uses them, so they sit below all of them."""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 tchar
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A path goes verbatim into a request line: visible ASCII only, no spaces.
_REQUEST_PATH = re.compile(r"/[!-~]*")


class ConfigError(Exception):
    """Every problem found in a config, each as "dotted.key.path: message"."""

    errors: list[str]

    def __init__(self, errors: str | Iterable[str]) -> None:
        # A lone string is one error, not an iterable of characters.
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        Exception.__init__(self, "\n".join(self.errors))


class Problems:
    """Collects a section's broken invariants so they are reported together."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[str] = []

    def check(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.errors.append(f"{key}: {message}")

    def positive(self, key: str, value: float) -> None:
        self.check(value > 0, key, "must be greater than 0")

    def at_least(self, key: str, value: int, low: int) -> None:
        self.check(value >= low, key, f"must be at least {low}")

    def token(self, key: str, value: str | None, what: str) -> None:
        if value is not None:
            self.check(_TOKEN.fullmatch(value) is not None, key, f"not a valid {what}: {value!r}")

    def env_name(self, key: str, value: str | None) -> None:
        if value is not None:
            ok = _ENV_NAME.fullmatch(value) is not None
            self.check(ok, key, f"not a valid environment variable name: {value!r}")

    def request_path(self, key: str, value: str) -> None:
        ok = _REQUEST_PATH.fullmatch(value) is not None
        self.check(
            ok, key, f"must start with '/' and hold no spaces or control characters: {value!r}"
        )

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)
