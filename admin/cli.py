"""The ``bgproxy`` command: serve, check, demo, and operator commands against a running proxy.

Exit codes scripts can trust: 0 ok, 1 the proxy refused (reason printed), 2 usage,
config or connection error. A proxy fronting several services answers an unscoped
command with 400 ``service_required``: that is a usage error (exit 2), like a missing
argument, and ``status`` then prints the services so the next try can name one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from admin.cli_output import (
    drain_line,
    format_events,
    format_services,
    format_status,
    interval_line,
    rollback_line,
)
from admin.cli_rollout import follow_rollout, steps_arg
from config import ConfigError, load_config
from config.tls import warnings as tls_warnings

DEFAULT_ADMIN = "http://127.0.0.1:9901"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Refused(Exception):
    """The proxy said no; the reason is already printed. Ends the command with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--admin", default=default, help="admin API URL ($BGPROXY_ADMIN_URL)")
    parser.add_argument(
        "--service",
        default=default,
        metavar="NAME",
        help="the service to act on, when the proxy fronts several ($BGPROXY_SERVICE)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON for scripts",
    )


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value


def _steps(text: str) -> list[int]:
    try:
        return steps_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_ROLLOUT_VERBS = {
    "promote": "send all traffic to the running rollout's color now",
    "abort": "stop the running rollout: the stable color gets all traffic back",
    "pause": "hold the running rollout at its step (still watched)",
    "resume": "let a paused rollout move on",
}


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
    p.add_argument(
        "--tls-port", type=int, default=8443, help="HTTPS, with a self-signed certificate"
    )
    p.add_argument(
        "--app-ports",
        default="9001,9002,9003,9004",
        help="sample app ports: shop blue,shop green,api blue,api green "
        "(with two, api's apps take free ports)",
    )

    p = sub.add_parser("services", help="list the services with their live color and traffic")
    _common(p, suppress=True)
    p = sub.add_parser("status", help="show the routing state")
    _common(p, suppress=True)
    p = sub.add_parser("switch", help="make a color live")
    p.add_argument("color", choices=["blue", "green"])
    p.add_argument("--reason")
    p.add_argument("--force", action="store_true", help="skip pre-switch gates")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the drain and the rollback watch to the end (exit 1 if rolled back)",
    )
    _common(p, suppress=True)
    p = sub.add_parser("weights", help="split traffic by weights")
    p.add_argument("blue", type=int)
    p.add_argument("green", type=int)
    p.add_argument("--reason")
    p.add_argument("--force", action="store_true", help="skip pre-switch gates")
    _common(p, suppress=True)
    p = sub.add_parser("rollback", help="restore the previous state")
    p.add_argument("--reason")
    p.add_argument(
        "--force",
        action="store_true",
        help="roll back even right after an automatic rollback (back to the color that failed)",
    )
    _common(p, suppress=True)
    p = sub.add_parser("rollout", help="move traffic to a color in steps, watching each one")
    p.add_argument("color", choices=["blue", "green"])
    p.add_argument("--steps", type=_steps, help="the new color's weights, e.g. 10,25,50,100")
    p.add_argument("--interval", help="time at each step, e.g. 30s (default: rollout config)")
    p.add_argument("--reason")
    p.add_argument("--force", action="store_true", help="skip pre-switch gates and hooks")
    p.add_argument(
        "--wait", action="store_true", help="follow it: exit 0 when promoted, 1 when aborted"
    )
    _common(p, suppress=True)
    for verb, text in _ROLLOUT_VERBS.items():
        p = sub.add_parser(verb, help=text)
        if verb in ("promote", "abort"):
            p.add_argument("--reason")
        _common(p, suppress=True)
    p = sub.add_parser("events", help="show the audit trail")
    p.add_argument("--limit", type=_limit, default=20, metavar="N", help="newest N (1-1000)")
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
    except Refused as exc:
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `bgproxy events | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "serve":
        from admin.serve import main_serve

        code: int = main_serve(args.config, args.workers)
        return code
    if cmd == "check":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        for warning in tls_warnings(config.tls):  # a certificate expiring within 14 days
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.config}: ok")
        return 0
    if cmd == "demo":
        from admin.demo import main_demo

        demo_code: int = main_demo(
            args.port, args.admin_port, args.app_ports, tls_port=args.tls_port
        )
        return demo_code
    return _operator(args)


# -- operator commands ----------------------------------------------------------------------

# Answers that mean the command itself is wrong (bad input, no or wrong token, wrong
# URL): exit 2 like a usage error. Any other refusal (409 gate failed or generation
# mismatch, 503 store unavailable) is the proxy saying no: exit 1.
_USAGE_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 415})
_POLL_INTERVAL = 0.5


def _admin_base(args: argparse.Namespace) -> str:
    base = (args.admin or os.environ.get("BGPROXY_ADMIN_URL") or DEFAULT_ADMIN).strip()
    if "://" not in base:
        base = "http://" + base  # "127.0.0.1:9901" is what people type
    return base.rstrip("/")


def _request(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, Any]]:
    base = _admin_base(args)
    data = json.dumps(body).encode() if body is not None else None
    try:
        req = urllib.request.Request(base + path, data=data, method=method)
    except ValueError as exc:
        raise CliError(f"--admin: not a usable URL: {base!r}", 2) from exc
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = os.environ.get("BGPROXY_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read() or b"{}")
            status = resp.status
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        if not isinstance(payload, dict) or "error" not in payload:
            # Not the admin API talking (a proxy in front, a wrong port): say what we got.
            payload = {"error": "http_error", "detail": f"HTTP {exc.code} {exc.reason}"}
        return exc.code, payload
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(
            f"cannot reach the admin API at {base}: {reason} "
            "(is the proxy running? --admin URL or $BGPROXY_ADMIN_URL)",
            2,
        ) from exc
    except ValueError as exc:
        raise CliError(f"the admin API at {base} did not answer JSON", 2) from exc
    if not isinstance(payload, dict):
        raise CliError(f"the admin API at {base} answered unexpected JSON", 2)
    return status, payload


def _service(args: argparse.Namespace) -> str | None:
    name = getattr(args, "service", None) or os.environ.get("BGPROXY_SERVICE") or ""
    return name.strip() or None


def _scoped(args: argparse.Namespace, path: str) -> str:
    """``/status`` -> ``/services/shop/status`` when a service is named, else unchanged."""
    name = _service(args)
    if name is None:
        return path
    return f"/services/{urllib.parse.quote(name, safe='')}{path}"


def _refused(args: argparse.Namespace, status: int, payload: dict[str, Any]) -> int:
    error = payload.get("error")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"refused ({status} {error}): {payload.get('detail')}", file=sys.stderr)
        if error == "gate_failed":
            print("  fix the cause and retry, or --force to skip the gates", file=sys.stderr)
        elif error == "service_required":
            print(
                "  this proxy fronts several services: pass --service NAME "
                "(or set $BGPROXY_SERVICE); `bgproxy services` lists them",
                file=sys.stderr,
            )
        elif error == "unknown_service":
            print("  `bgproxy services` lists the services this proxy fronts", file=sys.stderr)
        elif status == 401:
            print("  set $BGPROXY_ADMIN_TOKEN to the proxy's admin token", file=sys.stderr)
    return 2 if status in _USAGE_STATUSES else 1


def _checked(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The answer of a call that must succeed; a refusal ends the command with its code."""
    status, payload = _request(args, method, path, body)
    if status >= 400:
        if payload.get("error") == "service_required" and args.command == "status":
            _show_services_instead(args)
        raise Refused(_refused(args, status, payload))
    return payload


def _show_services_instead(args: argparse.Namespace) -> None:
    """``bgproxy status`` on a proxy with several services: show them all (stdout), so the
    operator sees the state at a glance and which name to pass next time."""
    if args.json:
        return  # scripts get the error object alone, as for any refusal
    status, payload = _request(args, "GET", "/services")
    if status < 400 and isinstance(payload.get("services"), list):
        print(format_services(payload["services"]))


def _summary(before: dict[str, Any], after: dict[str, Any]) -> str:
    def show(s: dict[str, Any]) -> str:
        w = s.get("weights") or {}
        if w.get("blue") and w.get("green"):
            return f"split blue {w['blue']} / green {w['green']}"
        return str(s.get("active"))

    gen_before, gen_after = before.get("generation"), after.get("generation")
    service = after.get("service")
    where = f"{service}: " if service and service != "default" else ""
    if gen_before == gen_after:
        return f"{where}nothing to change: {show(after)} is already live (generation {gen_after})"
    return f"{where}{show(before)} -> {show(after)}   (generation {gen_before} -> {gen_after})"


def _guard_rollback(args: argparse.Namespace, before: dict[str, Any]) -> None:
    """Right after an automatic rollback, ``/rollback`` would restore the state before it:
    traffic back on the color that just failed. Ask for --force (as the dashboard
    disables its button)."""
    rb = before.get("rollback") or {}
    if args.force or rb.get("state") != "rolled_back":
        return
    failed = rb.get("color") or "the failed color"
    message = (
        f"the last change was an automatic rollback of {failed}: rolling back now would "
        f"send traffic back to {failed}, the color that just failed. "
        f"Use `bgproxy switch {failed}` (its gates run) or `bgproxy rollback --force`."
    )
    if args.json:
        print(json.dumps({"error": "rolled_back", "detail": message}, indent=2))
    else:
        print(f"refused: {message}", file=sys.stderr)
    raise Refused(1)


def _operator(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "services":
        payload = _checked(args, "GET", "/services")
        if args.json:
            print(json.dumps(payload, indent=2))
        else:
            print(format_services(payload.get("services") or []))
        return 0
    if cmd == "status":
        payload = _checked(args, "GET", _scoped(args, "/status"))
    elif cmd == "events":
        payload = _checked(args, "GET", _scoped(args, f"/events?limit={args.limit}"))
    else:
        before = _checked(args, "GET", _scoped(args, "/status"))
        if cmd == "switch":
            body: dict[str, Any] = {"color": args.color}
            if args.force:
                body["force"] = True
            path = "/switch"
        elif cmd == "weights":
            body, path = {"blue": args.blue, "green": args.green}, "/weights"
            if args.force:
                body["force"] = True
        elif cmd == "rollback":
            _guard_rollback(args, before)
            body, path = {}, "/rollback"
        elif cmd == "rollout":
            body, path = {"color": args.color}, "/rollout"
            if args.steps:
                body["steps"] = args.steps
            if args.interval:
                body["step_interval"] = args.interval
            if args.force:
                body["force"] = True
        elif cmd in _ROLLOUT_VERBS:
            body, path = {}, f"/rollout/{cmd}"
        else:  # pragma: no cover - argparse rejects unknown commands
            raise CliError(f"unknown command {cmd}", 2)
        if getattr(args, "reason", None):
            body["reason"] = args.reason
        payload = _checked(args, "POST", _scoped(args, path), body)
        if not args.json:
            print(_summary(before, payload))
        if cmd == "rollout" and args.wait:
            progress = Progress(enabled=not args.json)
            try:
                return follow_rollout(
                    lambda: _checked(args, "GET", _scoped(args, "/status")),
                    progress,
                    payload,
                    args.json,
                    _POLL_INTERVAL,
                )
            except KeyboardInterrupt:
                print("\nstopped waiting; the rollout goes on (bgproxy status)")
                return 130
        if cmd == "switch" and args.wait:
            try:
                return follow_switch(args, args.color, payload)
            except KeyboardInterrupt:
                generation = payload.get("generation")
                print(f"\nstopped waiting; the switch stands (generation {generation})")
                return 130
    if args.json:
        print(json.dumps(payload, indent=2))
    elif cmd == "events":
        print(format_events(payload.get("events", []), with_service=_service(args) is None))
    else:
        print(format_status(payload))
    return 0


# -- switch --wait ---------------------------------------------------------------------------


class Progress:
    """One status line: rewritten in place on a terminal, printed on change otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.key = ""
        self.printed_at = 0.0
        self.dirty = False

    def show(self, key: str, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            # Cut to the terminal's width: a wrapped line could not be rewritten in place.
            width = shutil.get_terminal_size().columns
            sys.stdout.write("\r\033[K" + text[: max(20, width - 1)])
            sys.stdout.flush()
            self.dirty = True
        elif key != self.key or now - self.printed_at >= 10:
            # A log or a CI job gets a line per change, and a heartbeat every 10 s.
            print(text, flush=True)
            self.printed_at = now
        self.key = key

    def done(self, text: str) -> None:
        if not self.enabled:
            return
        if self.dirty:
            sys.stdout.write("\r\033[K")
            self.dirty = False
        print(text, flush=True)


def _auto_reason(args: argparse.Namespace, generation: Any) -> str:
    status, payload = _request(args, "GET", _scoped(args, "/events?limit=20"))
    if status < 400:
        for event in payload.get("events", []):
            if event.get("trigger") == "auto" and event.get("generation") == generation:
                return str(event.get("reason") or "thresholds crossed")
    return "thresholds crossed"


def follow_switch(args: argparse.Namespace, color: str, after: dict[str, Any]) -> int:
    """Poll /status until the drain has ended and the rollback watch of ``color`` is over.

    Exit 0 when ``color`` is still live at the end, 1 when it was rolled back
    automatically or someone else changed the state meanwhile.
    """
    progress = Progress(enabled=not args.json)
    generation = after.get("generation")
    status = after
    drain_reported = False
    watched = False
    while True:
        now = time.time()
        drain = status.get("drain") or {}
        rb = status.get("rollback") or {}
        if status.get("generation") != generation:
            if rb.get("state") == "rolled_back" and rb.get("color") == color:
                reason = _auto_reason(args, status.get("generation"))
                progress.done(f"rollback    ROLLED BACK to {status.get('active')}: {reason}")
                message = f"{color} was rolled back automatically: {reason}"
            else:
                message = (
                    f"the state changed meanwhile: generation {status.get('generation')}, "
                    f"{status.get('active')} live"
                )
            if args.json:
                print(json.dumps(status, indent=2))
            print(f"bgproxy: {message}", file=sys.stderr)
            return 1
        if drain.get("state") == "draining":
            line = drain_line(drain, status.get("colors") or {}, now)
            progress.show("drain", f"drain       {line}")
        else:
            if not drain_reported and drain.get("state") == "done":
                progress.done(f"drain       {drain_line(drain, status.get('colors') or {}, now)}")
            drain_reported = True
            if rb.get("state") == "watching" and rb.get("color") == color:
                watched = True
                fails = rb.get("consecutive_failures") or 0
                progress.show(f"watch-{fails}", f"rollback    {rollback_line(rb, now)}")
            else:
                if rb.get("enabled") is False:
                    progress.done("rollback    not watched (automatic rollback disabled)")
                elif not watched:
                    # Only a change that gives a color traffic it did not have is watched.
                    progress.done(f"rollback    not watched ({color} already had traffic)")
                else:
                    progress.done(f"rollback    watch passed: {interval_line(rb.get('last'))}")
                progress.done(f"{color} is live (generation {generation})")
                if args.json:
                    print(json.dumps(status, indent=2))
                return 0
        time.sleep(_POLL_INTERVAL)
        status = _checked(args, "GET", _scoped(args, "/status"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
