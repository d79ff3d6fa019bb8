"""The observability sections: ``access_log``, ``request_id`` and ``tracing``.

Top-level only (not per service): one process writes one log stream and one trace
export, whatever service a request matched. Kept apart from ``schema.py`` so that file
stays the routing model; ``schema.Config`` holds these as fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Problems

ACCESS_LOG_FORMATS = ("json", "combined")
# Where a line goes besides a file path.
STREAM_DESTINATIONS = ("stdout", "stderr")
REQUEST_ID_MODES = ("auto", "on", "off")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 tchar


class _Problems(Problems):
    """``Problems`` with the one check only these sections make."""

    __slots__ = ()

    def share(self, key: str, value: float) -> None:
        self.check(0.0 <= value <= 1.0, key, f"must be between 0 and 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    destination: str | None = None  # None: off; stdout, stderr or a file path
    format: str = "json"
    sample: float = 1.0  # share of 1xx-3xx responses logged; 4xx/5xx always are
    # The proxy's own refusals (400/408/413/431) can come in floods: at most this many
    # lines a second are written for them, the rest counted in one summary line.
    rejections_per_second: int = 10

    def __post_init__(self) -> None:
        p = _Problems()
        dest = self.destination
        if dest is not None:
            p.check(
                bool(dest) and dest.isprintable() and not dest.endswith("/"),
                "destination",
                f"expected stdout, stderr or a file path, got {dest!r}",
            )
        p.check(
            self.format in ACCESS_LOG_FORMATS,
            "format",
            f"must be 'json' or 'combined', got {self.format!r}",
        )
        p.share("sample", self.sample)
        p.check(self.rejections_per_second >= 0, "rejections_per_second", "must be >= 0")
        p.raise_if_any()

    @property
    def enabled(self) -> bool:
        return self.destination is not None


@dataclass(frozen=True, slots=True)
class RequestIdConfig:
    header: str | None = "X-Request-Id"  # None: no request IDs at all
    # auto: made when something reads them (the access log or tracing is on), so a proxy
    # with neither pays nothing per request; on: always; off: never.
    mode: str = "auto"

    def __post_init__(self) -> None:
        p = _Problems()
        if self.header is not None:
            p.check(
                _TOKEN.fullmatch(self.header) is not None,
                "header",
                f"must be an HTTP header name, got {self.header!r}",
            )
        p.check(
            self.mode in REQUEST_ID_MODES,
            "mode",
            f"must be 'auto', 'on' or 'off', got {self.mode!r}",
        )
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str | None = None  # an OTLP/HTTP traces URL; None: no export
    sample_ratio: float = 0.01  # share of new traces recorded (a sampled parent is kept)
    service_name: str = "bgproxy"

    def __post_init__(self) -> None:
        p = _Problems()
        url = self.otlp_endpoint
        if url is not None:
            scheme, sep, rest = url.partition("://")
            p.check(
                bool(sep) and scheme in ("http", "https") and bool(rest) and url.isprintable(),
                "otlp_endpoint",
                f"expected an http:// or https:// URL, got {url!r}",
            )
        p.share("sample_ratio", self.sample_ratio)
        p.check(
            bool(self.service_name) and self.service_name.isprintable(),
            "service_name",
            "must be a non-empty printable string",
        )
        p.raise_if_any()


def request_ids_on(request_id: RequestIdConfig, access_log: AccessLogConfig,
                   tracing: TracingConfig) -> bool:  # fmt: skip
    """Whether this process makes and forwards request IDs."""
    if request_id.header is None or request_id.mode == "off":
        return False
    return request_id.mode == "on" or access_log.enabled or tracing.otlp_endpoint is not None
