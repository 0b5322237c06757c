"""STARTTLS: the server context and a TLS channel over any pair of fds (spec §8.7).

Imported at the first STARTTLS only, so a plain connection never loads `ssl`.
The channel runs OpenSSL on memory BIOs: qspp's fds 0 and 1 may be one socket
or two pipes, and the I/O loop keeps its own per-I/O timeout either way.
"""

import posix
import ssl

from . import control, replies
from .diag import log

CERTIFICATE = b"control/servercert.pem"
READ_SIZE = 131072


def reason(err) -> bytes:
    """One line of the SSL library's text for `err`, no CR or LF."""
    if isinstance(err, ssl.SSLError):
        # set_ciphers raises an SSLError made by Python, without .reason and
        # with the text as its only argument
        args = err.args
        text = getattr(err, "reason", None) or (
            args[1] if len(args) > 1 else args[0] if args else str(err))
        text = str(text).lower().replace("_", " ")
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split()).encode("ascii", "replace")


def _refused(what: bytes, why: bytes) -> None:
    # The client only sees a 454 while EHLO keeps offering STARTTLS: the admin
    # needs the cause on the server side (issue 10 #4), with the uid, as an
    # unreadable key is mostly a file the session user may not read.
    log(b"STARTTLS answered 454: %s (uid %d): %s" % (what, posix.geteuid(), why))


def context(env):
    """(SSLContext, None), or (None, the 454 reply); raises ControlError.

    Checked in the spec's order: the cipher file, the certificate, the ciphers.
    Every 454 also writes one stderr line with its reason.
    """
    ciphers = env.get(b"TLSCIPHERS")
    if ciphers is None:
        listed = control.read_list(b"control/tlsserverciphers")
        ciphers = b"DEFAULT" if listed is None else b":".join(listed)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    except (ssl.SSLError, OSError) as e:
        why = reason(e)
        _refused(b"cannot make a TLS context", why)
        return None, replies.tls_cannot_initialize(why)
    try:
        # an encrypted key must fail, not make OpenSSL prompt on a terminal
        ctx.load_cert_chain(CERTIFICATE, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        why = reason(e)
        _refused(b"cannot load " + CERTIFICATE, why)
        return None, replies.tls_missing_certificate(why)
    try:
        ctx.set_ciphers(ciphers.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        why = reason(e)
        _refused(b"cipher list from TLSCIPHERS or control/tlsserverciphers rejected", why)
        return None, replies.tls_cannot_initialize(why)
    return ctx, None


class Channel:
    """TLS over two raw callables: raw_read() -> bytes (b"" at EOF), raw_write(bytes).

    Both callables enforce the I/O timeout and raise on failure; the channel only
    moves bytes between them and OpenSSL.
    """

    def __init__(self, ctx, raw_read, raw_write):
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._raw_read = raw_read
        self._raw_write = raw_write

    def _send_pending(self) -> None:
        data = self._out.read()
        if data:
            self._raw_write(data)

    def _receive(self) -> None:
        data = self._raw_read()
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def handshake(self) -> None:
        """Raises ssl.SSLError (or the raw callables' errors) if it fails."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self._receive()
        self._send_pending()

    @property
    def cipher(self) -> bytes:
        return self._tls.cipher()[0].encode("ascii", "replace")

    @property
    def bits(self) -> int:
        """The cipher's secret bits, policy servers' encryption_keysize."""
        return self._tls.cipher()[2] or 0

    @property
    def version(self) -> bytes:
        """The protocol the handshake agreed on, e.g. `TLSv1.3`."""
        return (self._tls.version() or "unknown").encode("ascii", "replace")

    def read(self) -> bytes:
        """Decrypted bytes; b"" when the client closed TLS or the connection."""
        while True:
            try:
                data = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                self._send_pending()
                self._receive()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            self._send_pending()
            return data

    def write(self, data) -> None:
        self._tls.write(data)
        self._send_pending()
