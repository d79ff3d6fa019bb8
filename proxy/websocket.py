"""WebSocket relay: bytes pass through untouched, frame boundaries are followed.

After the 101 the proxy forwards both directions byte for byte (subprotocols,
extensions, fragmentation and close codes are the endpoints' own). It follows frame
headers without copying payloads so that it can put a frame of its own on the wire
between two messages: the reconnect message at handoff, and a close frame when the
proxy ends a connection (1012 on a switch, 1001 on shutdown, 1014 when the upstream
vanished) so a client never sees an abrupt 1006.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.interfaces import ResponseSink
    from proxy.upstream import UpstreamConnection

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE = 0x0, 0x1, 0x2, 0x8

CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012
CLOSE_BAD_GATEWAY = 1014


class FrameTracker:
    """Follows one direction's frame boundaries incrementally, header bytes only."""

    __slots__ = ("_hdr", "_remaining", "_want", "close_seen", "in_message", "messages")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to pass
        self._hdr = b""  # partial frame header
        self._want = 0  # header length once known (0: not yet)
        self.in_message = False  # inside a fragmented data message
        self.close_seen = False
        self.messages = 0  # data messages begun to end (their final frame started)

    @property
    def at_frame_boundary(self) -> bool:
        return self._remaining == 0 and not self._hdr

    @property
    def at_message_boundary(self) -> bool:
        """Between frames and not inside a fragmented message: a frame can go in here."""
        return self._remaining == 0 and not self._hdr and not self.in_message

    def feed(self, data: bytes, want_boundary: bool = False) -> int:
        """Consume ``data``; with ``want_boundary``, stop at and return the first offset
        where the stream is at a message boundary (the rest is not consumed). -1 if none."""
        n = len(data)
        if not want_boundary and not self._remaining and not self._hdr and n >= 2:
            # Fast path, the common case for chat-like traffic: exactly one small frame.
            b1 = data[1]
            ln = b1 & 0x7F
            if ln < 126 and n == 2 + ln + (4 if b1 & 0x80 else 0):
                b0 = data[0]
                opcode = b0 & 0x0F
                if opcode < 0x8:
                    self.in_message = not (b0 & 0x80)
                    if b0 & 0x80:
                        self.messages += 1
                elif opcode == OP_CLOSE:
                    self.close_seen = True
                return -1
        pos = 0
        while pos < n:
            if self._remaining:
                step = min(self._remaining, n - pos)
                self._remaining -= step
                pos += step
                if self._remaining == 0 and want_boundary and not self.in_message:
                    return pos
                continue
            # Header: 2 bytes, then 0/2/8 length bytes, then 0/4 mask bytes.
            need = self._want or 2
            take = min(need - len(self._hdr), n - pos)
            self._hdr += data[pos : pos + take]
            pos += take
            if len(self._hdr) < need:
                continue
            if not self._want:
                b1 = self._hdr[1]
                ln = b1 & 0x7F
                self._want = (
                    2 + (2 if ln == 126 else 8 if ln == 127 else 0) + (4 if b1 & 0x80 else 0)
                )
                if self._want > 2:
                    continue
            if self._frame_started() and want_boundary and not self.in_message:
                return pos
        return -1

    def _frame_started(self) -> bool:
        """A whole header is in: set up the payload; True if the frame is already complete."""
        hdr = self._hdr
        b0, b1 = hdr[0], hdr[1]
        ln = b1 & 0x7F
        if ln == 126:
            ln = struct.unpack_from("!H", hdr, 2)[0]
        elif ln == 127:
            ln = struct.unpack_from("!Q", hdr, 2)[0]
        opcode = b0 & 0x0F
        if opcode < 0x8:  # data frames move the message state; control frames do not
            self.in_message = not (b0 & 0x80)
            if b0 & 0x80:
                self.messages += 1
        elif opcode == OP_CLOSE:
            self.close_seen = True
        self._hdr = b""
        self._want = 0
        self._remaining = ln
        return ln == 0


def frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; client-to-server frames must be masked (RFC 6455 §5.3)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + key + masked


def close_frame(code: int, reason: str, mask: bool) -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120], mask)


class WebSocketRelay:
    """Both directions of one relayed WebSocket, and the frames the proxy adds to it."""

    __slots__ = (
        "_done",
        "_pending",
        "client",
        "close_deadline",
        "closing",
        "down",
        "ended_by",
        "reconnect_sent",
        "up",
        "upstream",
    )

    def __init__(self, client: ResponseSink, upstream: UpstreamConnection) -> None:
        self.client = client
        self.upstream = upstream
        self.down = FrameTracker()  # upstream -> client
        self.up = FrameTracker()  # client -> upstream
        self._pending: list[bytes] = []
        self.closing = False  # we sent our close frame to the client
        self.reconnect_sent = False
        self.close_deadline = 0.0
        self._done = False
        # Who ended the session, for its log line: client, upstream, handoff (our 1012
        # after a switch) or shutdown (our 1001); the first to close decides.
        self.ended_by = ""

    # -- relaying -------------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        if self.closing:
            return  # after our close frame nothing more may reach the client
        if not self._pending:
            down = self.down
            down.feed(data)
            self.client.write(data)
            if down.close_seen and not self.ended_by:
                self.ended_by = "upstream"
            return
        off = self.down.feed(data, want_boundary=True)
        if self.down.close_seen and not self.ended_by:
            self.ended_by = "upstream"
        if off < 0:
            self.client.write(data)
            return
        self.client.write(data[:off])
        self._flush_pending()
        if not self.closing and off < len(data):
            self.from_upstream(data[off:])

    def from_client(self, data: bytes) -> None:
        up = self.up
        up.feed(data)
        self.upstream.send(data)
        if up.close_seen and not self.ended_by:
            self.ended_by = "client"
        if self.closing and up.close_seen and up.at_frame_boundary and not self._done:
            # The client answered our close: the handshake is done on both legs.
            self._done = True
            self.client.close()
            self.upstream.close()

    # -- frames the proxy adds ------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._inject(frame(OP_TEXT, text.encode(), mask=False))

    def close(self, code: int, reason: str) -> None:
        """Close towards the client with ``code`` and tell the upstream the client left."""
        if self.closing:
            return
        if not self.ended_by:
            self.ended_by = "handoff" if code == CLOSE_SERVICE_RESTART else "shutdown"
        self._inject(close_frame(code, reason, mask=False))

    def _inject(self, data: bytes) -> None:
        self._pending.append(data)
        if self.down.at_message_boundary:
            self._flush_pending()

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for data in pending:
            if self.closing:
                break
            self.client.write(data)
            if data[0] & 0x0F == OP_CLOSE:
                self.closing = True
                if self.up.at_message_boundary and not self.up.close_seen:
                    self.upstream.send(close_frame(CLOSE_GOING_AWAY, "client going away", True))

    def upstream_lost(self) -> None:
        """The upstream went away: a close frame beats a bare TCP reset (1006)."""
        if not self.ended_by:
            self.ended_by = "upstream"
        if not self.closing and not self.down.close_seen and self.down.at_message_boundary:
            self.client.write(close_frame(CLOSE_BAD_GATEWAY, "upstream went away", mask=False))
        self.closing = True

    def client_lost(self) -> None:
        if not self.ended_by:
            self.ended_by = "client"
        if not self.up.close_seen and self.up.at_message_boundary:
            self.upstream.send(close_frame(CLOSE_GOING_AWAY, "client went away", mask=True))
