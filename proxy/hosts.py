"""Which service a request belongs to, by its Host and path (SPEC "Services").

Built once per config. The host decides first: an exact name beats ``*.suffix`` (one or
more labels before the suffix; the longest suffix wins), which beats ``*``. Among the
services claiming that most specific host pattern, the longest path prefix on a ``/``
boundary wins. If none of them claims the path, the request goes to the default service
(or nowhere: 404); it never falls back to a less specific host pattern, as nginx picks a
``server`` and then a ``location`` in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# (prefix, prefix + "/", service)
_Route = tuple[bytes, bytes, Any]
_UNSEEN = object()  # not memoized yet (None is a memoized "no routes")

# Host headers are the client's: the memo of host -> routes is bounded.
_MEMO_LIMIT = 4096


def host_name(host: bytes) -> str:
    """The Host header's name, lowercased, without its port (IPv6 literals keep [])."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.partition(":")[0].rstrip(".")


class ServiceTable:
    """``match(host, target)`` -> the service, or None. ``only`` is set when one service
    claims every request (the single-service form): the request path then skips matching.
    Compiled as a C type (hosts.pxd): matching is one C call per request."""

    def __init__(
        self, claims: Iterable[tuple[Any, Iterable[str], Iterable[str]]], default: Any
    ) -> None:
        # pattern -> [(prefix, prefix + "/", service)], longest prefix first
        table: dict[str, list[_Route]] = {}
        for service, hosts, paths in claims:
            for host in hosts:
                routes = table.setdefault(host, [])
                routes.extend((p.encode(), p.rstrip("/").encode() + b"/", service) for p in paths)
        for routes in table.values():
            routes.sort(key=lambda r: len(r[0]), reverse=True)
        self._exact = {h: r for h, r in table.items() if not h.startswith("*")}
        self._suffixes = {h[1:]: r for h, r in table.items() if h.startswith("*.")}
        self._any = table.get("*")
        self.default = default
        self._memo: dict[bytes, list[_Route] | None] = {}
        only = None
        if self._any is not None and len(table) == 1 and len({r[2] for r in self._any}) == 1:
            if any(r[0] == b"/" for r in self._any):
                only = self._any[0][2]
        self.only: Any = only

    def _routes(self, host: bytes | None) -> list[_Route] | None:
        if host is None:
            return self._any
        memo = self._memo.get(host, _UNSEEN)
        if memo is not _UNSEEN:
            return memo  # type: ignore[return-value]
        name = host_name(host)
        found = self._exact.get(name)
        if found is None and self._suffixes:
            # Longest suffix first: "a.b.shop.example" tries ".b.shop.example", then
            # ".shop.example", ...; "*.x" never matches "x" itself.
            dot = name.find(".")
            while dot >= 0 and found is None:
                found = self._suffixes.get(name[dot:])
                dot = name.find(".", dot + 1)
        if found is None:
            found = self._any
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[host] = found
        return found

    def match(self, host: bytes | None, target: bytes) -> Any:
        routes = self._routes(host)
        if routes is not None:
            # The path is never cut from the target: a prefix holds no "?", so the path
            # starts with ``below`` when the target does, and the path is ``prefix`` when
            # the target is, or is it and a query.
            n = len(target)
            for prefix, below, service in routes:
                if target.startswith(below):
                    return service
                k = len(prefix)
                if target.startswith(prefix) and (n == k or target[k] == 63):
                    return service
        return self.default
