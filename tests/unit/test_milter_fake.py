"""FakeMilter: an in-test milter speaking the wire protocol from a thread.

Used by tests/unit/test_milter.py and tests/e2e/test_milter.py.  It listens on
a unix socket, answers option negotiation with the version, actions and steps
it was given, records every packet it receives per connection, and answers
each event that expects a reply: `continue` unless `answers` holds a callable
for that command byte, which returns the packets to send (bytes from `pkt`, or
a generator of them, sent as they come), or one of the bad-peer behaviours
CLOSE (close the socket) and HANG (never answer).
"""

import os
import socket
import struct
import threading

CLOSE = "close"
HANG = "hang"

# the no-reply flag of each event a reply may be skipped for
_NR = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
       b"L": 0x80, b"N": 0x40000, b"B": 0x80000}


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def optneg_reply(version=6, actions=0x1FF, protocol=0, extra=b"") -> bytes:
    return pkt(b"O", struct.pack(">III", version, actions, protocol) + extra)


class Conversation:
    def __init__(self):
        self.packets = []
        self.closed = threading.Event()

    def cmds(self) -> bytes:
        return b"".join(c for c, _ in self.packets)

    def data(self, cmd: bytes):
        return [d for c, d in self.packets if c == cmd]

    def macros(self, stage: bytes) -> dict:
        out = {}
        for d in self.data(b"D"):
            if d[:1] == stage:
                parts = d[1:].split(b"\0")
                out.update(zip(parts[0::2], parts[1::2]))
        return out

    def body(self) -> bytes:
        return b"".join(self.data(b"B"))


class FakeMilter:
    def __init__(self, path, version=6, actions=0x1FF, protocol=0, answers=None,
                 negotiation=None, extra=b""):
        self.path = str(path)
        self.version = version
        self.actions = actions
        self.protocol = protocol
        self.answers = dict(answers or {})
        self.negotiation = negotiation  # raw bytes to answer O with instead
        self.extra = extra  # macro lists after the three words
        self.conversations = []
        self.hang = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "unix:" + self.path

    @property
    def last(self) -> Conversation:
        return self.conversations[-1]

    def stop(self) -> None:
        self.hang.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conv = Conversation()
            self.conversations.append(conv)
            threading.Thread(target=self._talk, args=(conn, conv), daemon=True).start()

    def _talk(self, conn, conv) -> None:
        buf = b""
        try:
            while True:
                while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                n = struct.unpack(">I", buf[:4])[0]
                cmd, data, buf = buf[4:5], buf[5:4 + n], buf[4 + n:]
                conv.packets.append((cmd, data))
                if cmd == b"O":
                    conn.sendall(self.negotiation if self.negotiation is not None else
                                 optneg_reply(self.version, self.actions, self.protocol, self.extra))
                    continue
                if cmd == b"Q":
                    return
                if cmd in (b"D", b"A"):
                    continue
                answer = self.answers.get(cmd)
                if answer is not None:
                    out = answer(data)
                    if out == CLOSE:
                        return
                    if out == HANG:
                        self.hang.wait(30)
                        return
                    if hasattr(out, "__next__"):  # a generator: each piece as it comes
                        for piece in out:
                            conn.sendall(piece)
                        continue
                    if out is not None:
                        conn.sendall(out)
                        continue
                if cmd == b"E" or not self.protocol & _NR.get(cmd, 0):
                    conn.sendall(pkt(b"c"))
        except OSError:
            pass
        finally:
            conn.close()
            conv.closed.set()
