"""Access-log records and lines as the tests build and read them."""

from __future__ import annotations

import re
import time
from typing import Any

from proxy.logformat import RECORD_SIZE

COMBINED = re.compile(
    rb'(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d+) '
    rb'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" "(?P<color>[^"]*)" '
    rb'"(?P<service>[^"]*)" "(?P<rid>[^"]*)" (?P<duration>[0-9.]+)'
)


def record(**fields: Any) -> tuple[Any, ...]:
    values: list[Any] = [
        time.monotonic(), "127.0.0.1", b"GET", b"/", b"1.1", 200, 10, 20, 0.001, 0.0005,
        "default", "blue", "active", "http://127.0.0.1:1", b"rid-1", None, None, None, None,
        None,
    ]  # fmt: skip
    names = ["end", "client", "method", "target", "version", "status", "bytes_in",
             "bytes_out", "duration", "upstream_time", "service", "color", "reason",
             "upstream", "request_id", "head", "tls", "sni", "ws", "trace"]  # fmt: skip
    assert len(names) == RECORD_SIZE
    for key, value in fields.items():
        values[names.index(key)] = value
    return tuple(values)
