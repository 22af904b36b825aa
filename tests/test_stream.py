"""common/stream.py: multi-frame messages over an AF_UNIX stream (the agent <-> worker channel)."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlfleet.common import stream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def read_all(reader: stream.Reader, count: int) -> list[list[bytes]]:
    got: list[list[bytes]] = []
    while len(got) < count:
        got += [[bytes(f) for f in msg] for msg in reader.read()]
    return got


def test_small_and_large_messages_round_trip(pair):
    a, b = pair
    big = np.arange(3 << 18, dtype=np.float32)  # 3 MiB: larger than the read buffer
    msgs = [[b"head", b"", b"x" * 10], [b"h2", big], [b"only"]]
    t = threading.Thread(target=lambda: [stream.send_blocking(a, m) for m in msgs])
    t.start()
    got = read_all(stream.Reader(b), 3)
    t.join(10)
    assert got == [[bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in m] for m in msgs]


def test_zmq_frames_and_memoryviews_are_sent_as_their_bytes(pair):
    zmq = pytest.importorskip("zmq")
    a, b = pair
    stream.send_blocking(a, [zmq.Frame(b"frame"), memoryview(b"view"), bytearray(b"ba")])
    assert read_all(stream.Reader(b), 1) == [[b"frame", b"view", b"ba"]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=3000), min_size=1, max_size=5), min_size=1, max_size=8),
       st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_any_split_of_the_bytes_gives_the_same_messages(msgs, cuts):
    """The reader takes the stream however the kernel hands it over."""
    wire = b"".join(b"".join(bytes(v) for v in stream.encode(m)) for m in msgs)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        reader = stream.Reader(b)
        got: list[list[bytes]] = []
        at, i = 0, 0
        while at < len(wire):
            n = cuts[i % len(cuts)]
            a.sendall(wire[at:at + n])
            at += n
            i += 1
            while True:  # everything sent so far, read before the next piece
                b.setblocking(False)
                out = reader.read()
                b.setblocking(True)
                got += [[bytes(f) for f in m] for m in out]
                if not out:
                    break
        assert got == msgs
    finally:
        a.close()
        b.close()


def test_the_writer_never_blocks_and_delivers_in_order(pair):
    a, b = pair
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    w = stream.Writer(a)
    payloads = [[f"h{i}".encode(), bytes([i]) * 200_000] for i in range(5)]
    flushed = [w.send(p) for p in payloads]
    assert not all(flushed) and w.pending  # the socket took less than 1 MB: the rest waits
    reader = stream.Reader(b)
    b.setblocking(False)
    got: list[list[bytes]] = []
    while len(got) < 5:
        w.flush()
        got += [[bytes(f) for f in m] for m in reader.read()]
    assert got == payloads and not w.pending


@pytest.mark.parametrize("prefix, rule", [
    (struct.pack("<I", 0), "1 to"),
    (struct.pack("<I", stream.MAX_FRAMES + 1), "1 to"),
    (struct.pack("<3I", 2, 1 << 30, 1), "at most"),
])
def test_a_peer_that_breaks_the_framing_is_refused(pair, prefix, rule):
    a, b = pair
    a.sendall(prefix)
    with pytest.raises(stream.StreamError, match=rule):
        stream.Reader(b).read()


def test_eof_is_reported(pair):
    a, b = pair
    stream.send_blocking(a, [b"last"])
    a.close()
    reader = stream.Reader(b)
    assert read_all(reader, 1) == [[b"last"]]
    with pytest.raises(EOFError):
        reader.read()


def test_a_message_needs_a_frame():
    with pytest.raises(ValueError):
        stream.encode([])


def test_a_first_message_alone_then_the_rest_within_new_limits(pair):
    a, b = pair
    msgs = ([b"who"], [b"header", b"x" * 5000], [b"y" * 300_000])  # small, then larger ones
    t = threading.Thread(target=lambda: [stream.send_blocking(a, m) for m in msgs], daemon=True)
    t.start()
    reader = stream.Reader(b, max_frames=1, max_bytes=16, first_alone=True)
    assert read_all(reader, 1) == [[b"who"]]  # what came behind it is not read under these limits
    rest = [[bytes(f) for f in m] for m in reader.set_limits(stream.MAX_FRAMES, stream.MAX_BYTES)]
    rest += read_all(reader, 2 - len(rest))
    assert rest == [[b"header", b"x" * 5000], [b"y" * 300_000]]
    t.join(10)
    assert not t.is_alive()


def test_a_large_message_is_buffered_as_it_arrives(pair, monkeypatch):
    monkeypatch.setattr(stream, "AHEAD", 1000)
    a, b = pair
    body = bytes(range(256)) * 40  # 10,240 bytes: the buffer grows 1000 -> 2000 -> ... as they come
    t = threading.Thread(target=stream.send_blocking, args=(a, [b"h", body]), daemon=True)
    t.start()
    reader = stream.Reader(b, max_frames=4, max_bytes=1 << 20)
    reader._buf = bytearray(64)  # a small read buffer, so the message takes the large path
    reader._view = memoryview(reader._buf)
    assert read_all(reader, 1) == [[b"h", body]]
    t.join(10)
    assert not t.is_alive()
