"""Where access-log lines go: stdout, stderr or a file, never blocking the event loop.

Lines from several processes (``--workers``) share one destination and must never
interleave. The guarantee rests on one rule: **every ``write()`` carries whole lines, and
to anything but a file opened here at most ``PIPE_BUF`` (4096) bytes**. POSIX makes such
a write to a pipe atomic, and on a file opened with ``O_APPEND`` the kernel moves the
offset to the end and copies the bytes under the file's lock in one step, so two
processes' writes land one after the other (there, pieces of up to 64 KiB: fewer
writes). A line longer than ``PIPE_BUF`` is cut to fit before it gets here
(logformat.py).

Nothing here may stall the data plane:

- a file is written with ``O_APPEND``; an error (disk full, a deleted directory, lost
  permissions) drops the lines, counts them in ``dropped`` and warns at most once a
  minute; while the file cannot be opened, opening is retried once a second;
- a pipe (stdout under a supervisor, ``| jq``, a container runtime) is reopened through
  ``/proc/self/fd`` as a new open file description with ``O_NONBLOCK``, so the rest of
  the process keeps its blocking stdout; a named pipe given as the path is opened
  non-blocking too. A full pipe keeps up to ``backlog`` bytes here
  and retries on the next flush; past that, lines are dropped and counted.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from collections import deque

log = logging.getLogger("bgproxy.accesslog")

PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
# A file this process opened with O_APPEND takes bigger pieces: the kernel appends each
# write() whole under the file's lock whatever its size, and nginx's buffer=64k shows
# what fewer writes are worth.
FILE_PIECE = 64 * 1024
WARN_EVERY = 60.0
REOPEN_EVERY = 1.0
STREAMS = {"stdout": 1, "stderr": 2}


def _nonblocking_copy(fd: int) -> int:
    """A new open file description for what ``fd`` refers to, non-blocking; or a plain
    duplicate when the kernel will not reopen it (a socket)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return os.dup(fd)
    if stat.S_ISREG(mode):
        # A file (``demo > out.txt``) never blocks; a duplicate shares its offset with
        # print() and logging, where a new description would write over their text.
        return os.dup(fd)
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_APPEND
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        flags |= os.O_NONBLOCK
    try:
        return os.open(f"/proc/self/fd/{fd}", flags)
    except OSError:
        return os.dup(fd)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class LineSink:
    """Takes batches of whole lines and writes them in atomic pieces."""

    def __init__(self, destination: str, backlog: int = 1 << 20) -> None:
        self.destination = destination
        self.backlog = backlog
        self.dropped = 0  # lines
        self.fd = -1
        self.piece_max = PIPE_BUF  # bytes of whole lines per write()
        self._queue: deque[tuple[bytes, int]] = deque()  # (piece, its line count)
        self._queued = 0
        self._warned_at = -WARN_EVERY
        self._open_failed_at: float | None = None
        self.error: str | None = None  # why the destination could not be opened, if so
        self._open()

    # -- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        dest = self.destination
        try:
            if dest in STREAMS:
                self.fd = _nonblocking_copy(STREAMS[dest])
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                if _is_fifo(dest):  # a named pipe to a log shipper: never wait on it
                    flags |= os.O_NONBLOCK
                self.fd = os.open(dest, flags, 0o644)
                if stat.S_ISREG(os.fstat(self.fd).st_mode):
                    self.piece_max = FILE_PIECE
        except OSError as exc:
            self.fd = -1
            self._open_failed_at = time.monotonic()
            self.error = f"cannot open {dest}: {exc.strerror or exc}"
            self._warn(f"access log: {self.error}")
            return
        self._open_failed_at = None
        self.error = None

    def reopen(self) -> None:
        """SIGUSR1 (logrotate's ``postrotate``): finish with the old file, open the path
        again. A stream keeps its descriptor."""
        if self.destination in STREAMS:
            return
        self.flush()
        self._close_fd()
        self._open()

    def close(self) -> None:
        self.flush(final=True)
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    # -- writing ------------------------------------------------------------------------

    def write_lines(self, lines: list[bytes]) -> None:
        """Queue ``lines`` (each ending in a newline, none longer than PIPE_BUF) in pieces
        of whole lines, then write what the destination takes now."""
        piece: list[bytes] = []
        size = 0
        queue = self._queue
        for line in lines:
            n = len(line)
            if size + n > PIPE_BUF and piece:
                queue.append((b"".join(piece), len(piece)))
                self._queued += size
                piece = []
                size = 0
            piece.append(line)
            size += n
        if piece:
            queue.append((b"".join(piece), len(piece)))
            self._queued += size
        self.flush()
        self._trim()

    def write_pieces(self, pieces: list[tuple[bytes, int]]) -> None:
        """Queue pieces of whole lines, each at most ``piece_max`` bytes, with their line
        counts, then write what the destination takes."""
        for piece in pieces:
            self._queue.append(piece)
            self._queued += len(piece[0])
        self.flush()
        self._trim()

    def _trim(self) -> None:
        # A stalled reader must not make the proxy hold unbounded memory.
        queue = self._queue
        while self._queued > self.backlog and queue:
            piece, count = queue.popleft()
            self._queued -= len(piece)
            self._drop(count, "access log destination is not keeping up")

    def flush(self, final: bool = False) -> None:
        if self.fd < 0:
            if self._queue and self._open_failed_at is not None:
                if time.monotonic() - self._open_failed_at >= REOPEN_EVERY:
                    self._open()
            if self.fd < 0:
                self._drop_all("access log is not open")
                return
        queue = self._queue
        tries = 50 if final else 1
        while queue:
            piece, count = queue[0]
            try:
                written = os.write(self.fd, piece)
            except BlockingIOError:
                tries -= 1
                if tries <= 0:
                    break
                time.sleep(0.002)  # only at close: the last lines are worth a short wait
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                queue.popleft()
                self._queued -= len(piece)
                why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
                self._drop(count, f"cannot write access log {self.destination}: {why}")
                continue
            queue.popleft()
            self._queued -= len(piece)
            if written < len(piece):
                # Only a file that filled up mid-write gets here (a pipe takes a piece of
                # at most PIPE_BUF whole or not at all): the rest of the piece is lost.
                self._drop(piece.count(b"\n", written), "short write to the access log")
        if final and queue:
            self._drop_all("access log destination did not drain before exit")

    def _drop_all(self, why: str) -> None:
        n = sum(count for _, count in self._queue)
        self._queue.clear()
        self._queued = 0
        if n:
            self._drop(n, why)

    def _drop(self, lines: int, why: str) -> None:
        self.dropped += lines
        self._warn(f"{why}; {self.dropped} access log lines dropped so far")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("%s", message)
