"""``ConfigError``: every section module raises it, so it sits below all of them."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(Exception):
    """Every problem found in a config, each as "dotted.key.path: message"."""

    errors: list[str]

    def __init__(self, errors: str | Iterable[str]) -> None:
        # A lone string is one error, not an iterable of characters.
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        Exception.__init__(self, "\n".join(self.errors))
