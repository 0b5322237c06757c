"""smtpd.Connection's raw reads and writes on the client's descriptors: each
waits under timeoutsmtpd (spec §7), in poll() or (as serve arranges it) in the
socket's own SO_RCVTIMEO/SO_SNDTIMEO, and a client that stops reading or has
gone ends the session with the exit it gets in qmail."""

import socket
import struct
import threading
import time

import pytest

from qspp import smtpd


class _Session:
    out = bytearray()
    flush_soon = False


@pytest.fixture(params=["poll", "socket timeouts"])
def pair(request):
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _kernel_timeouts[ours.fileno()] = request.param != "poll"
    yield ours, peer
    del _kernel_timeouts[ours.fileno()]
    ours.close()
    peer.close()


_kernel_timeouts = {}  # the mode of each pair's socket, by fd


def _connection(sock, timeout):
    kernel = _kernel_timeouts[sock.fileno()]
    if kernel:
        tv = struct.pack("@ll", timeout, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    return smtpd.Connection(_Session(), timeout, sock.fileno(), sock.fileno(),
                            kernel_timeouts=kernel)


def test_a_reply_larger_than_the_buffers_arrives_whole_and_in_order(pair):
    ours, peer = pair
    data = bytes(range(256)) * 4096          # 1 MiB: many times what the buffers hold
    got = bytearray()

    def drain():
        peer.settimeout(10)
        while len(got) < len(data):
            chunk = peer.recv(65536)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.001)                 # a slow reader: the writer must wait
    reader = threading.Thread(target=drain)
    reader.start()
    _connection(ours, 10)._raw_write(data)
    reader.join(10)
    assert bytes(got) == data


def test_a_client_that_never_reads_meets_the_write_timeout(pair):
    ours, peer = pair
    conn = _connection(ours, 1)
    t0 = time.monotonic()
    with pytest.raises(smtpd._Exit) as ex:
        # replies, as a session writes them between reads
        for _ in range(100000):
            conn._raw_write(b"250 ok\r\n" * 50)
    took = time.monotonic() - t0
    assert (ex.value.status, ex.value.end) == (1, "write timeout")
    assert 0.9 <= took < 3


def test_one_large_write_to_a_client_that_never_reads_still_times_out(pair):
    """A flush far larger than the buffers (a pipelining flood's replies) goes
    out in pieces, each after its own poll(): none can block in write()."""
    ours, peer = pair
    ended = []

    def write():
        try:
            _connection(ours, 1)._raw_write(b"250 ok\r\n" * 100000)
        except smtpd._Exit as ex:
            ended.append((ex.status, ex.end))
    writer = threading.Thread(target=write, daemon=True)
    t0 = time.monotonic()
    writer.start()
    writer.join(10)
    blocked = writer.is_alive()
    if blocked:
        peer.close()  # the blocked write fails, and the thread ends
        writer.join(10)
    assert not blocked, "the write blocked past its timeout"
    assert ended == [(1, "write timeout")]
    assert 0.9 <= time.monotonic() - t0 < 3


def test_a_write_to_a_closed_client_is_a_write_error(pair):
    ours, peer = pair
    peer.close()
    with pytest.raises(smtpd._Exit) as ex:
        _connection(ours, 5)._raw_write(b"250 ok\r\n" * 10000)
    assert (ex.value.status, ex.value.end) == (1, "write error")


def test_a_read_waits_for_the_client_and_keeps_its_timeout(pair):
    ours, peer = pair
    conn = _connection(ours, 1)
    threading.Timer(0.2, peer.sendall, (b"QUIT\r\n",)).start()
    assert conn._raw_read() == b"QUIT\r\n"
    t0 = time.monotonic()
    with pytest.raises(smtpd._Timeout):
        conn._raw_read()
    assert 0.9 <= time.monotonic() - t0 < 3
