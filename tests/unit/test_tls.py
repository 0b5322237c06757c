"""tls.py: the server context's refusals (qmail-smtpd.md §8.7) and the channel.

The channel is driven against a client SSLObject through in-memory pipes, so
the handshake, reads and writes run without sockets or processes (but for the
openssl call that makes the test certificate once).
"""

import os
import shutil
import ssl
import subprocess

import pytest

from qspp import tls
from qspp.control import ControlError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=mx.example.org", "-days", "2",
                    "-keyout", str(d / "k"), "-out", str(d / "c")],
                   check=True, capture_output=True)
    return (d / "k").read_bytes() + (d / "c").read_bytes()


@pytest.fixture
def home(tmp_path, monkeypatch, pem):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "servercert.pem").write_bytes(pem)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_context_loads(home):
    ctx, refusal = tls.context({})
    assert refusal is None and isinstance(ctx, ssl.SSLContext)


def test_invalid_certificate_is_454_missing_certificate(home):
    (home / "control" / "servercert.pem").write_bytes(b"junk\n")
    ctx, refusal = tls.context({})
    assert ctx is None
    assert refusal.startswith(b"454 TLS missing certificate: ")
    assert refusal.endswith(b" (#4.3.0)") and b"\r" not in refusal and b"\n" not in refusal


def test_rejected_cipher_list_is_454_ctx(home):
    ctx, refusal = tls.context({b"TLSCIPHERS": b"NO-SUCH-CIPHER"})
    assert ctx is None
    assert refusal.startswith(b"454 TLS unable to initialize ctx: ")
    (home / "control" / "tlsserverciphers").write_bytes(b"ALSO-NOT-ONE\n")
    assert tls.context({})[1].startswith(b"454 TLS unable to initialize ctx: ")
    # TLSCIPHERS wins over the file
    assert tls.context({b"TLSCIPHERS": b"DEFAULT"})[1] is None


def test_cipher_file_joined_with_colons(home):
    (home / "control" / "tlsserverciphers").write_bytes(b"ECDHE-RSA-AES128-GCM-SHA256\n# c\nDEFAULT\n")
    assert tls.context({})[1] is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_cipher_file_is_fatal(home):
    f = home / "control" / "tlsserverciphers"
    f.write_bytes(b"DEFAULT\n")
    f.chmod(0)
    with pytest.raises(ControlError):
        tls.context({})


def test_cipher_file_a_directory_is_fatal(home):
    (home / "control" / "tlsserverciphers").mkdir()
    with pytest.raises(ControlError):
        tls.context({})


class Pipe:
    """One direction of a connection: bytes written by one side, read by the other."""

    def __init__(self):
        self.data = bytearray()

    def take(self):
        out = bytes(self.data)
        self.data.clear()
        return out


def test_channel_handshake_and_records(home):
    ctx, _ = tls.context({})
    to_server, to_client = Pipe(), Pipe()
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    client = cctx.wrap_bio(cin, cout, server_hostname="mx.example.org")

    def pump_client():
        cin.write(to_client.take())
        to_server.data += cout.read()

    def server_read():
        # the client runs whenever the server would block for input
        for _ in range(10):
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            pump_client()
            if to_server.data:
                return to_server.take()
        return b""

    channel = tls.Channel(ctx, server_read, lambda data: to_client.data.extend(data))
    channel.handshake()
    pump_client()
    client.do_handshake()
    assert channel.cipher.startswith(b"TLS_")
    client.write(b"EHLO c\r\n")
    pump_client()
    assert channel.read() == b"EHLO c\r\n"
    channel.write(b"250 ok\r\n")
    pump_client()
    assert client.read(100) == b"250 ok\r\n"


def test_handshake_on_plaintext_fails(home):
    ctx, _ = tls.context({})
    sent = [b"NOOP\r\n", b""]
    channel = tls.Channel(ctx, lambda: sent.pop(0), lambda data: None)
    with pytest.raises(ssl.SSLError) as e:
        channel.handshake()
    assert tls.reason(e.value)
    assert b"\n" not in tls.reason(e.value)


def test_handshake_eof_fails(home):
    ctx, _ = tls.context({})
    channel = tls.Channel(ctx, lambda: b"", lambda data: None)
    with pytest.raises(ssl.SSLError):
        channel.handshake()


def test_encrypted_key_is_454_without_a_prompt(home, tmp_path):
    # OpenSSL would ask for the pass phrase on the terminal and wait forever
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-passout", "pass:pw",
                    "-subj", "/CN=x", "-days", "2", "-keyout", str(tmp_path / "ek"),
                    "-out", str(tmp_path / "ec")], check=True, capture_output=True)
    (home / "control" / "servercert.pem").write_bytes(
        (tmp_path / "ek").read_bytes() + (tmp_path / "ec").read_bytes())
    ctx, refusal = tls.context({})
    assert ctx is None and refusal.startswith(b"454 TLS missing certificate: ")
