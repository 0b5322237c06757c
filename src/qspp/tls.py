"""STARTTLS: the server context and a TLS channel over any pair of fds (spec §8.7).

Imported at the first STARTTLS only, so a plain connection never loads `ssl`.
The channel runs OpenSSL on memory BIOs: qspp's fds 0 and 1 may be one socket
or two pipes, and the I/O loop keeps its own per-I/O timeout either way.
"""

import ssl

from . import control, replies

CERTIFICATE = b"control/servercert.pem"
READ_SIZE = 131072


def reason(err) -> bytes:
    """One line of the SSL library's text for `err`, no CR or LF."""
    if isinstance(err, ssl.SSLError):
        # set_ciphers raises an SSLError made by Python, without .reason
        text = getattr(err, "reason", None) or (
            err.args[1] if len(err.args) > 1 else str(err))
        text = str(text).lower().replace("_", " ")
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split()).encode("ascii", "replace")


def context(env):
    """(SSLContext, None), or (None, the 454 reply); raises ControlError.

    Checked in the spec's order: the cipher file, the certificate, the ciphers.
    """
    ciphers = env.get(b"TLSCIPHERS")
    if ciphers is None:
        listed = control.read_list(b"control/tlsserverciphers")
        ciphers = b"DEFAULT" if listed is None else b":".join(listed)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    except (ssl.SSLError, OSError) as e:
        return None, replies.tls_cannot_initialize(reason(e))
    try:
        # an encrypted key must fail, not make OpenSSL prompt on a terminal
        ctx.load_cert_chain(CERTIFICATE, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        return None, replies.tls_missing_certificate(reason(e))
    try:
        ctx.set_ciphers(ciphers.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        return None, replies.tls_cannot_initialize(reason(e))
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
