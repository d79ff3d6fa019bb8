"""The frame tracker behind WebSocket handoff: boundaries must be right however bytes split."""

from __future__ import annotations

import random

import pytest

from proxy.websocket import OP_CLOSE, FrameTracker, close_frame, frame


def _stream(rng: random.Random) -> list[bytes]:
    frames = []
    for _ in range(rng.randint(1, 6)):
        op = rng.choice([0, 1, 2, 8, 9, 10])
        n = rng.choice([0, 1, 5, 125, 126, 300, 70000]) if op < 8 else rng.randint(0, 125)
        f = bytearray(frame(op, bytes(n), mask=rng.random() < 0.5))
        if op < 8 and rng.random() < 0.3:
            f[0] &= 0x7F  # not final: a fragmented message continues
        frames.append(bytes(f))
    return frames


@pytest.mark.parametrize("seed", range(40))
def test_whole_frames_and_random_splits_agree(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        frames = _stream(rng)
        whole, split = FrameTracker(), FrameTracker()
        for f in frames:
            whole.feed(f)  # one frame per read: the fast path
        data = b"".join(frames)
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 40)
            split.feed(data[pos : pos + step])
            pos += step
        assert (whole.in_message, whole.close_seen, whole.at_frame_boundary) == (
            split.in_message,
            split.close_seen,
            split.at_frame_boundary,
        )
        assert whole.at_frame_boundary


def test_boundary_offset_is_after_the_message_not_inside_a_fragment() -> None:
    first = bytearray(frame(1, b"part-1", mask=False))
    first[0] &= 0x7F  # text, not final
    ping = frame(9, b"", mask=False)  # control frames may sit between fragments
    last = frame(0, b"part-2", mask=False)  # final continuation
    data = bytes(first) + ping + last
    t = FrameTracker()
    assert t.feed(data, want_boundary=True) == len(data)
    assert t.at_message_boundary


def test_close_frame_is_seen() -> None:
    t = FrameTracker()
    t.feed(close_frame(1000, "bye", mask=True))
    assert t.close_seen and t.at_frame_boundary
    assert close_frame(1012, "x", mask=False)[0] & 0x0F == OP_CLOSE
