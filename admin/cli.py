"""The ``bgproxy`` command: serve, check, demo, and operator commands against a running proxy.

Exit codes scripts can trust: 0 ok, 1 the proxy refused (reason printed), 2 usage,
config or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from config import ConfigError, load_config

DEFAULT_ADMIN = "http://127.0.0.1:9901"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--admin", default=default, help="admin API URL ($BGPROXY_ADMIN_URL)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON for scripts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgproxy", description="blue-green traffic switching proxy"
    )
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=1, help="data-plane processes")

    p = sub.add_parser("check", help="validate a config file")
    p.add_argument("-c", "--config", required=True)

    p = sub.add_parser("demo", help="run a self-contained demo (sample apps + proxy)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--app-ports", default="9001,9002", help="blue,green sample app ports")

    p = sub.add_parser("status", help="show the routing state")
    _common(p, suppress=True)
    p = sub.add_parser("switch", help="make a color live")
    p.add_argument("color", choices=["blue", "green"])
    p.add_argument("--reason")
    p.add_argument("--force", action="store_true", help="skip pre-switch gates")
    _common(p, suppress=True)
    p = sub.add_parser("weights", help="split traffic by weights")
    p.add_argument("blue", type=int)
    p.add_argument("green", type=int)
    _common(p, suppress=True)
    p = sub.add_parser("rollback", help="restore the previous state")
    p.add_argument("--reason")
    _common(p, suppress=True)
    p = sub.add_parser("events", help="show the audit trail")
    p.add_argument("--limit", type=int, default=20)
    _common(p, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except CliError as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "serve":
        from admin.runner import main_serve

        code: int = main_serve(args.config, args.workers)
        return code
    if cmd == "check":
        try:
            load_config(args.config)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        print(f"{args.config}: ok")
        return 0
    if cmd == "demo":
        from admin.demo import main_demo

        demo_code: int = main_demo(args.port, args.admin_port, args.app_ports)
        return demo_code
    return _operator(args)


# -- operator commands ----------------------------------------------------------------------


def _request(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    base = (args.admin or os.environ.get("BGPROXY_ADMIN_URL") or DEFAULT_ADMIN).rstrip("/")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = os.environ.get("BGPROXY_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {"error": "http_error", "detail": f"HTTP {exc.code}"}
        return exc.code, payload
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the admin API at {base}: {reason}", 2) from exc
    except ValueError as exc:
        raise CliError(f"the admin API at {base} did not answer JSON", 2) from exc


def _operator(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "status":
        status, payload = _request(args, "GET", "/status")
    elif cmd == "switch":
        body: dict[str, Any] = {"color": args.color}
        if args.reason:
            body["reason"] = args.reason
        if args.force:
            body["force"] = True
        status, payload = _request(args, "POST", "/switch", body)
    elif cmd == "weights":
        weights = {"blue": args.blue, "green": args.green}
        status, payload = _request(args, "POST", "/weights", weights)
    elif cmd == "rollback":
        status, payload = _request(
            args, "POST", "/rollback", {"reason": args.reason} if args.reason else {}
        )
    elif cmd == "events":
        status, payload = _request(args, "GET", f"/events?limit={args.limit}")
    else:  # pragma: no cover - argparse rejects unknown commands
        raise CliError(f"unknown command {cmd}", 2)
    if status >= 400:
        if args.json:
            print(json.dumps(payload, indent=2))
        else:
            print(
                f"refused ({status} {payload.get('error')}): {payload.get('detail')}",
                file=sys.stderr,
            )
        return 2 if status in (400, 401, 404, 405, 413) else 1
    if args.json:
        print(json.dumps(payload, indent=2))
    elif cmd == "events":
        print(format_events(payload.get("events", [])))
    else:
        print(format_status(payload))
    return 0


def format_status(s: dict[str, Any]) -> str:
    w = s.get("weights", {})
    lines = [
        f"active      {s.get('active')}",
        f"weights     blue={w.get('blue')} green={w.get('green')}",
        f"generation  {s.get('generation')}   previous {s.get('previous')}   "
        f"changed {s.get('changed_at')}",
        "",
        f"{'COLOR':<7} {'HEALTHY':<8} {'IN-FLIGHT':>9} {'WEBSOCKETS':>10}  TARGETS",
    ]
    for name, c in s.get("colors", {}).items():
        targets = ", ".join(
            f"{t['url']}{'' if t['healthy'] else ' (down)'}" for t in c.get("targets", [])
        )
        lines.append(
            f"{name:<7} {'yes' if c.get('healthy') else 'NO':<8} {c.get('in_flight', 0):>9} "
            f"{c.get('websockets', 0):>10}  {targets}"
        )
    lines.append("")
    for label, part in (("drain", s.get("drain") or {}), ("rollback", s.get("rollback") or {})):
        color = f" ({part['color']})" if part.get("color") else ""
        lines.append(f"{label:<11} {part.get('state')}{color}")
    instances = s.get("instances") or []
    if instances:
        lines.append("")
        lines.append(f"{'INSTANCE':<24} {'GENERATION':>10}  LAST SEEN")
        for i in instances:
            lines.append(
                f"{i.get('id', '?'):<24} {i.get('generation', '?'):>10}  {i.get('last_seen')}"
            )
    return "\n".join(lines)


def format_events(events: list[dict[str, Any]]) -> str:
    if not events:
        return "no events"
    lines = [f"{'AT':<25} {'GEN':>4} {'ACTION':<9} {'FROM':<22} {'TO':<22} {'BY':<7} REASON"]
    for e in events:
        by = e.get("actor") if e.get("trigger") == "manual" else "auto"
        lines.append(
            f"{e.get('at', ''):<25} {e.get('generation', ''):>4} {e.get('action', ''):<9} "
            f"{e.get('from') or '-':<22} {e.get('to') or '-':<22} {by:<7} {e.get('reason') or ''}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
