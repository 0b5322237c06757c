"""A serve worker's own state: its signals (the ones its children start
from), the connections it takes."""

import fcntl
import os
import resource
import signal
import socket

import pytest

from qspp import serve


def worker_sigxfsz(limit):
    """SIGXFSZ's disposition after a worker's signal setup, in a child with
    RLIMIT_FSIZE at `limit` (and CPython's own ignore to start from)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            serve._reset_signals()
            os.write(w, b"%d" % signal.getsignal(signal.SIGXFSZ))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    os.waitpid(pid, 0)
    return int(got)


def test_no_file_size_limit_defaults_sigxfsz():
    # no write can exceed a limit there is not: children need the default
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        pytest.skip("this test run has a file size limit")
    assert worker_sigxfsz(resource.RLIM_INFINITY) == signal.SIG_DFL


def test_a_file_size_limit_keeps_sigxfsz_ignored():
    # a write past it must fail with EFBIG (a 451), not kill the worker
    assert worker_sigxfsz(1 << 20) == signal.SIG_IGN


def test_an_accepted_connection_is_blocking():
    # the listener is non-blocking (workers wait in epoll); a session's reads
    # and writes on the connection must not be
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    client = socket.create_connection(listener.getsockname())
    try:
        worker = serve.Worker(type("S", (), {"listeners": [listener]})(), 0)
        conn, peer = worker.accept([(listener.fileno(), 1)])
        try:
            assert peer == client.getsockname()
            assert conn.gettimeout() is None
            assert not fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            assert (conn.family, conn.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert conn.getsockname() == listener.getsockname()
        finally:
            conn.close()
    finally:
        client.close()
        listener.close()


def timeouts(sock):
    tv = serve._TIMEVAL
    return tuple(tv.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, tv.size))[0]
                 for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO))


def test_io_timeouts_are_set_and_reach_the_next_connection_through_the_listener():
    """timeoutsmtpd on the session's socket; the listener gets it too, so an
    accepted socket already has it, and a changed timeoutsmtpd still wins."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    worker = serve.Worker(type("S", (), {"listeners": [listener]})(), 0)
    clients = []

    def accepted():
        # the kernel makes the socket when the handshake ends, from the
        # listener as it is then
        clients.append(socket.create_connection(listener.getsockname()))
        return worker.accept([(listener.fileno(), 1)])[0]
    try:
        first = accepted()
        assert timeouts(first) == (0, 0)
        worker.conn = first
        assert worker._io_timeouts(7)
        assert timeouts(first) == timeouts(listener) == (7, 7)
        second = accepted()
        assert timeouts(second) == (7, 7)
        worker.conn = second
        assert worker._io_timeouts(7)
        assert worker._io_timeouts(3)  # timeoutsmtpd changed
        assert timeouts(second) == timeouts(listener) == (3, 3)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, serve._TIMEVAL.pack(9, 0))
        third = accepted()  # another worker set one option to another value meanwhile
        assert timeouts(third) == (3, 9)
        worker.conn = third
        assert worker._io_timeouts(3)
        assert timeouts(third) == timeouts(listener) == (3, 3)
        for conn in (first, second, third):
            conn.close()
        listener.close()  # a stop signal closed it: the session still gets its timeouts
        fourth = socket.socket()
        worker.conn = fourth
        assert worker._io_timeouts(3)
        assert timeouts(fourth) == (3, 3)
        fourth.close()
        assert not worker._io_timeouts(3)  # no socket: the session polls instead
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_open_fds_leaves_out_the_listings_own():
    r, w = os.pipe()
    got = serve._open_fds()
    os.close(w)
    try:
        assert {r, w} <= got
        assert got == {n for n in got if os.path.exists("/proc/self/fd/%d" % n)} | {w}
        assert serve._open_fds() == got - {w}
    finally:
        os.close(r)


def test_fd_check_finds_a_descriptor_left_open_and_nothing_after_a_clean_session():
    check = serve.FdCheck()
    assert check.left_open() == []
    r, w = os.pipe()
    os.close(w)
    try:
        assert check.left_open() == [r]   # found by the poll, named by the listing
    finally:
        os.close(r)
    assert check.left_open() == []


def test_fd_check_poll_alone_answers_a_clean_session(monkeypatch):
    check = serve.FdCheck()
    listings = []
    listed = serve._open_fds
    monkeypatch.setattr(serve, "_open_fds", lambda: listings.append(1) or listed())
    for _ in range(check.FULL_EVERY - 1):
        os.close(os.open(os.devnull, os.O_RDONLY))  # a session's own, closed again
        assert check.left_open() == []
    assert listings == []
    assert check.left_open() == []   # the periodic full listing
    assert listings == [1]


def test_fd_check_finds_one_beyond_the_probed_numbers_by_the_periodic_listing():
    check = serve.FdCheck()
    high = max(check.all_closed)[0] + 10
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, high, inheritable=False)
    os.close(null)
    try:
        found = [check.left_open() for _ in range(check.FULL_EVERY)]
    finally:
        os.close(high)
    assert found[:-1] == [[]] * (check.FULL_EVERY - 1)
    assert found[-1] == [high]


def test_fd_check_an_open_descriptor_with_an_event_is_not_taken_for_closed():
    # a hung-up socket answers POLLHUP even with no events asked for
    check = serve.FdCheck()
    a, b = socket.socketpair()
    b.close()
    try:
        assert check.left_open() == [a.fileno()]
    finally:
        a.close()


def test_fd_check_takes_the_workers_new_descriptors_as_its_own():
    check = serve.FdCheck()
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # reloaded rules, say
    try:
        assert check.left_open(also_held=(fd,)) == []
        assert fd in check.held
        assert check.left_open() == []   # now the worker's own: no listing needed
    finally:
        os.close(fd)
    for _ in range(check.FULL_EVERY):
        assert check.left_open() == []
    assert fd not in check.held          # gone at the next full listing
