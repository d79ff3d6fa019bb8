"""The access-log writer on real files, pipes and processes: lines stay whole, a broken
destination drops and counts lines instead of blocking, rotation reopens the path."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from access_records import COMBINED, record

from proxy.accesslog import AccessLog
from proxy.logformat import (
    _Clock,
    _Names,
    clf_text,
    format_combined,
    head_fields,
    header_values,
    json_text,
)
from proxy.logsink import PIPE_BUF, LineSink

ROOT = Path(__file__).resolve().parent.parent

# Header values a hostile client can send (bytes llhttp lets through, and worse).
HOSTILE = [
    b'"quoted" \\backslash\\',
    b"new\nline\rcarriage",
    b"\x00\x01\x1b[31mred\x1b[0m\x7f",
    b"\xff\xfe invalid utf-8 \xc3",
    "é ü 漢字 \u2028 line separator".encode(),
    b'}{"status":200,"fake":true',
    b"nul\x00byte",  # NUL alone: the common line's check must not let it through raw
    b"x" * 9000,
]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_values_keep_one_json_object_per_line(value: bytes, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(asyncio.get_running_loop(), str(path))
    head = [(b"User-Agent", value), (b"Referer", value)]
    log.add(record(target=b"/p?" + value, head=head, request_id=value, method=value[:20]))
    log.close()
    text = path.read_bytes()
    assert text.count(b"\n") == 1 and text.endswith(b"\n")
    assert len(text) <= PIPE_BUF
    line = json.loads(text)
    assert text.isascii()  # no raw control, DEL, line separator or invalid byte survives
    if len(value) < 1000:
        assert line["user_agent"] == value.decode("utf-8", "backslashreplace")
        assert line["target"] == "/p?" + value.decode("utf-8", "backslashreplace")
        assert "truncated" not in line
    else:
        assert line["truncated"] is True
        assert line["user_agent"].startswith("xxxx")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_keep_one_combined_line(value: bytes) -> None:
    line = format_combined(record(target=value, head=[(b"user-agent", value)]), _Clock(), _Names())
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert all(0x20 <= c < 0x7F for c in line[:-1])
    # What a combined-log parser (GoAccess, awk on quotes) reads: the fields stay apart.
    m = COMBINED.fullmatch(line[:-1])
    assert m is not None, line
    assert m["request"] == b"GET %s HTTP/1.1" % clf_text(value[:2048])
    assert m["agent"] == clf_text(value[:1024])
    assert (m["status"], m["color"], m["rid"]) == (b"200", b"blue", b"rid-1")


def test_the_head_scan_reads_what_the_reference_reader_reads() -> None:
    # The compiled build finds the user agent and referer in a raw head by a C loop; the
    # reference is a lower-case copy and find(). Odd cases: any case, white space around
    # values, a field twice, look-alike names, a name in a value, no final line end.
    rng = random.Random(18)
    names = [b"User-Agent", b"user-agent", b"USER-AGENT", b"Referer", b"rEfErEr", b"X-User-Agent",
             b"User-Agents", b"Referer-Policy", b"Host", b"Accept"]  # fmt: skip
    values = [b"", b"a", b" padded \t", b"\x0bvt\x0c", b"x: user-agent: y", b"\xff\x00z",
              b"Mozilla/5.0 (X11)", b"referer:"]  # fmt: skip
    for _ in range(3000):
        lines = [b"GET /%d HTTP/1.1" % rng.randrange(9)]
        for _ in range(rng.randrange(6)):
            lines.append(rng.choice(names) + rng.choice([b":", b": ", b":\t"]) + rng.choice(values))
        head = b"\r\n".join(lines) + rng.choice([b"\r\n\r\n", b"\r\n", b"", b"\r"])
        assert head_fields(head) == header_values(head), head
    assert head_fields(None) == (None, None)
    assert head_fields([(b"USER-AGENT", b"u"), (b"referer", b"r")]) == (b"u", b"r")


@pytest.mark.parametrize(
    "duration", [0.0, 0.0005, 0.0015, 0.0025, 0.1235, 1.0005, 2.9995, 12.34549]
)
def test_combined_duration_is_printf_text(duration: float) -> None:
    # Whole milliseconds by integer arithmetic, except near a tie: the text is always
    # what "%.3f" prints (nginx's $request_time has three decimals too).
    rng = random.Random(duration)
    for d in [duration, *(duration + rng.uniform(-1e-3, 1e-3) for _ in range(200))]:
        d = max(d, 0.0)
        line = format_combined(record(duration=d), _Clock(), _Names())
        assert line.rstrip(b"\n").rsplit(b" ", 1)[1] == b"%.3f" % d


def test_escaping_is_what_nginx_and_json_readers_expect() -> None:
    assert clf_text(b'a"b\\c\n\xff') == b"a\\x22b\\x5Cc\\x0A\\xFF"
    assert json.loads(b'"%s"' % json_text(b'a"b\\c\n\x01\xc3\xa9\xff')) == 'a"b\\c\n\x01é\\xff'
    assert json_text(b"/plain/path?q=1") == b"/plain/path?q=1"


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from proxy.accesslog import AccessLog
    from proxy.logsink import LineSink

    async def main(dest, worker, n):
        log = AccessLog(asyncio.get_running_loop(), dest)
        for i in range(n):
            # ~700 bytes a line: a few lines fill a PIPE_BUF piece, so pieces of many
            # processes would tear lines if a write were not whole.
            log.line(b'{"worker":%d,"i":%d,"pad":"%s"}\\n' % (worker, i, b"x" * (600 + i % 97)))
            if i % 50 == 0:
                await asyncio.sleep(0)
        log.close()
        print("DROPPED", log.dropped, file=sys.stderr if dest == "stdout" else sys.stdout)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


def _check_lines(data: bytes, n: int, dropped: list[int]) -> None:
    """Every line whole; each worker's lines in order, and those missing are exactly the
    ones it counted as dropped."""
    seen: dict[int, list[int]] = {w: [] for w in range(len(dropped))}
    for raw in data.splitlines():
        line = json.loads(raw)  # a torn line fails here
        assert line["pad"] == "x" * (600 + line["i"] % 97)
        seen[line["worker"]].append(line["i"])
    for w, lines in seen.items():
        assert lines == sorted(set(lines)), f"worker {w} duplicated or reordered lines"
        assert len(lines) + dropped[w] == n, f"worker {w} lost lines it did not count"


def test_processes_appending_to_one_file_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    workers, n = 6, 3000
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), str(n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for w in range(workers)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and out.split() == [b"DROPPED", b"0"]
    _check_lines(path.read_bytes(), n, [0] * workers)


def test_processes_sharing_one_pipe_never_interleave(tmp_path: Path) -> None:
    # The workers' stdout is one pipe (a supervisor's, a container runtime's): the
    # reader here is slower than the writers, so the pipe fills and writes must wait.
    workers, n = 4, 1500
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nout = open(sys.argv[1], 'wb')\n"
         "while chunk := sys.stdin.buffer.read(8192):\n    out.write(chunk); time.sleep(0.001)",
         str(tmp_path / "out")],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert reader.stdin is not None
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, "stdout", str(w), str(n)],
            cwd=ROOT,
            stdout=reader.stdin,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for w in range(workers)
    ]
    reader.stdin.close()
    dropped = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0
        dropped.append(int(err.split(b"DROPPED ")[-1]))
    assert reader.wait(timeout=60) == 0
    _check_lines((tmp_path / "out").read_bytes(), n, dropped)


def test_stdout_redirected_to_a_file_keeps_the_text_printed_around_the_lines(
    tmp_path: Path,
) -> None:
    # `bgproxy demo > out.txt`: print() and the log sink write the same stdout; neither
    # may write over the other (a file opened without O_APPEND has one shared offset).
    script = (
        "from proxy.logsink import LineSink\n"
        "print('before', flush=True)\n"
        "sink = LineSink('stdout')\n"
        "sink.write_lines([b'line 1\\n', b'line 2\\n'])\n"
        "print('after', flush=True)\n"
        "sink.close()\n"
    )
    out = tmp_path / "out.txt"
    with open(out, "w") as stdout:  # truncating, as `>` opens it
        subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, stdout=stdout, check=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert out.read_text().splitlines() == ["before", "line 1", "line 2", "after"]


async def test_a_full_disk_drops_and_counts_lines_without_raising() -> None:
    log = AccessLog(asyncio.get_running_loop(), "/dev/full")  # every write: ENOSPC
    for _ in range(10):
        log.add(record())
    log.flush()
    assert log.dropped == 10
    log.close()


async def test_a_pipe_nobody_reads_never_blocks_the_loop(tmp_path: Path) -> None:
    fifo = tmp_path / "shipper.fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a log shipper that stopped reading
    try:
        sink = LineSink(str(fifo), backlog=64 * 1024)
        line = b'{"x":"%s"}\n' % (b"y" * 200)
        started = time.monotonic()
        for _ in range(2000):  # ~420 KiB into a 64 KiB pipe and a 64 KiB backlog
            sink.write_lines([line])
        assert time.monotonic() - started < 2.0
        assert sink.dropped > 0
        kept = os.read(r, 1 << 20)
        assert kept.endswith(b"\n")
        assert all(json.loads(x) == {"x": "y" * 200} for x in kept.splitlines())
        started = time.monotonic()
        sink.close()  # waits briefly for the backlog, then drops it: bounded
        assert time.monotonic() - started < 1.0
    finally:
        os.close(r)


async def test_rotation_reopens_and_a_deleted_directory_drops_then_recovers(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "access.log"
    log = AccessLog(asyncio.get_running_loop(), str(path))
    log.add(record(target=b"/before"))
    log.flush()
    os.rename(path, logs / "access.log.1")  # logrotate's mv
    log.add(record(target=b"/still-old"))
    log.reopen()  # SIGUSR1
    log.add(record(target=b"/after"))
    log.flush()
    old = [json.loads(x)["target"] for x in (logs / "access.log.1").read_bytes().splitlines()]
    assert old == ["/before", "/still-old"]
    assert json.loads(path.read_bytes())["target"] == "/after"

    for f in logs.iterdir():
        f.unlink()
    logs.rmdir()
    log.reopen()  # the directory is gone: nothing to open
    log.add(record(target=b"/lost"))
    log.flush()
    assert log.dropped == 1
    logs.mkdir()
    log.sink._open_failed_at = time.monotonic() - 2  # a second later, as the retry waits
    log.add(record(target=b"/back"))
    log.flush()
    assert json.loads(path.read_bytes())["target"] == "/back"
    log.close()
