"""SPPLOG: one stderr line per plugin run and a summary per connection (spp.md §6.5).

Imported when SPPLOG is set, and by a failed AUTH for its `auth-failed` line,
so a normal connection pays nothing.  Lines keep the common `qspp: pid PID: `
prefix; the text after it is `key=value` pairs, or one JSON object with
`SPPLOG=json`.  README.md ("Logs") documents the fields; names only ever get
added, so admins' greps keep working.
"""

from .diag import log

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  b"@%+-_./:,<>[]()=#")


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _quote(value) -> str:
    if isinstance(value, (int, float)):
        return str(value)
    raw = value if isinstance(value, bytes) else str(value).encode()
    if raw and all(c in _SAFE for c in raw):
        return raw.decode("ascii")
    # quoted so a parser can split the line at spaces; \ and " escaped, and
    # control bytes too, so one connection stays one line for multilog/journald
    # (escaped before decoding, so an undecodable byte reads \xHH, not \\xHH)
    text = _text(raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"'))
    return '"%s"' % text.translate(_CONTROL)


_CONTROL = {c: "\\x%02x" % c for c in list(range(0x20)) + [0x7F]}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
# C1 controls and the Unicode line separators: some readers end a line there
_CONTROL.update({c: "\\u%04x" % c for c in list(range(0x80, 0xA0)) + [0x2028, 0x2029]})


# The summary names at most this many transactions, recipients in each, and
# plugin runs; the rest are only counted, so a client cannot grow the journal
# without bound.
MAX_LISTED = 100

_QUEUED = b"250 ok "


def auth_failed(ip: bytes, mechanism: bytes, user: bytes) -> None:
    """The line fail2ban reads for a `535`, written whether SPPLOG is set or not.

    The address comes first and the client's words (the user) last, quoted
    and escaped: no user name can put another `ip=` where a filter anchors.
    """
    log("auth-failed ip=%s mechanism=%s user=%s"
        % (_quote(ip), _quote(mechanism), _quote(user)))


def queue_id(reply: bytes):
    """The `qp N` of `250 ok T qp N` (qmail-queue's pid, which qmail logs as
    the message's `qp` too), or None for any other reply."""
    if not reply.startswith(_QUEUED):
        return None
    words = reply.split()
    if len(words) == 5 and words[3] == b"qp" and words[4].isdigit():
        return int(words[4])
    return None


class Journal:
    """Collects what the summary line reports; writes the run lines at once."""

    def __init__(self, mode: bytes):
        self.json = mode == b"json"
        self.transactions = []
        self.unlisted = 0
        self.current = None
        self.runs = []          # (section, entry, verdict, ms) for the summary
        self.unlisted_runs = 0
        self.auths = []         # (outcome, mechanism, user or None)
        self.unlisted_auths = 0
        self.tls_outcome = None  # (outcome, protocol, cipher, reason) of the last STARTTLS

    def _write(self, event: str, fields) -> None:
        if self.json:
            import json
            obj = {"event": event}
            for key, value in fields:
                obj[key] = _jsonable(value)
            log(json.dumps(obj, separators=(",", ":")))
        else:
            log(event + "".join(" %s=%s" % (k, _quote(v)) for k, v in fields))

    def run(self, phase: str, entry: bytes, verdict, exit_status, ms: int) -> None:
        self._write("spp-run", (("section", phase), ("entry", entry), ("verdict", verdict),
                                ("exit", "-" if exit_status is None else exit_status), ("ms", ms)))
        if len(self.runs) >= MAX_LISTED:
            self.unlisted_runs += 1
        else:
            self.runs.append((phase, entry, verdict, ms))

    # -- the transaction trail for the summary -------------------------------

    def mail(self, sender: bytes, reply: bytes, by: bytes) -> None:
        # an accepted MAIL has no outcome until DATA gives it one
        reply = reply.rstrip(b"\r\n")
        refused = not _last_line(reply).startswith(b"250")
        if len(self.transactions) >= MAX_LISTED:
            self.unlisted += 1
            self.current = None
            return
        self.current = {"from": sender, "rcpt": [], "bytes": None, "unlisted": 0,
                        "outcome": reply if refused else b"-", "by": by if refused else b"-"}
        self.transactions.append(self.current)

    def rcpt(self, recipient: bytes, reply: bytes, by: bytes) -> None:
        if self.current is not None:
            if len(self.current["rcpt"]) >= MAX_LISTED:
                self.current["unlisted"] += 1
            else:
                self.current["rcpt"].append((recipient, _last_line(reply)[:3], by))

    def auth(self, mechanism: bytes, user, outcome: str) -> None:
        """An AUTH that got past the 503s: ok, failed, refused (an [auth]
        plugin), error (a 454), malformed, canceled or encryption-required."""
        if len(self.auths) >= MAX_LISTED:
            self.unlisted_auths += 1
        else:
            self.auths.append((outcome, mechanism, user))

    def tls(self, outcome: str, protocol, cipher, refusal) -> None:
        """STARTTLS: ok (protocol, cipher), failed (handshake) or unavailable
        (no usable certificate or context); refusal is the 454 sent then."""
        self.tls_outcome = (outcome, protocol, cipher,
                            None if refusal is None else refusal.rstrip(b"\r\n"))

    def message(self, size, reply: bytes, by: bytes) -> None:
        if self.current is not None:
            self.current["bytes"] = size
            self.current["outcome"] = reply.rstrip(b"\r\n")
            self.current["by"] = by

    def summary(self, settings, helo, end: str) -> None:
        fields = [("ip", settings.remoteip), ("host", settings.remotehost or b"unknown"),
                  ("helo", b"-" if helo is None else helo)]
        if self.json:
            fields.append(("transactions", [
                {"from": t["from"],
                 "rcpt": [{"to": r, "reply": c, "by": b} for r, c, b in t["rcpt"]],
                 "more_rcpt": t["unlisted"],
                 "bytes": t["bytes"], "outcome": t["outcome"], "qp": queue_id(t["outcome"]),
                 "by": t["by"]}
                for t in self.transactions]))
            fields.append(("more_transactions", self.unlisted))
            fields.append(("runs", [{"section": p, "entry": e, "verdict": v, "ms": ms}
                                    for p, e, v, ms in self.runs]))
            fields.append(("more_runs", self.unlisted_runs))
            # only for connections that used them, as mailN: older lines stay as they were
            if self.tls_outcome is not None:
                outcome, protocol, cipher, refusal = self.tls_outcome
                tls = {"outcome": outcome}
                if outcome == "ok":
                    tls["protocol"], tls["cipher"] = protocol, cipher
                else:
                    tls["reason"] = refusal
                fields.append(("tls", tls))
            if self.auths or self.unlisted_auths:
                fields.append(("auth", [{"mechanism": m, "user": u, "outcome": o}
                                        for o, m, u in self.auths]))
                fields.append(("more_auth", self.unlisted_auths))
        else:
            for n, t in enumerate(self.transactions, 1):
                fields.append(("mail%d" % n, b"<" + t["from"] + b">"))
                fields.append(("rcpt%d" % n, b",".join(
                    b"<%s>:%s%s" % (r, c, b"" if b == b"qmail" and c == b"250" else b"/" + b)
                    for r, c, b in t["rcpt"]) or b"-"))
                if t["unlisted"]:
                    fields.append(("more_rcpt%d" % n, t["unlisted"]))
                fields.append(("bytes%d" % n, "-" if t["bytes"] is None else t["bytes"]))
                fields.append(("outcome%d" % n, t["outcome"]))
                qp = queue_id(t["outcome"])
                fields.append(("qp%d" % n, "-" if qp is None else qp))
                fields.append(("by%d" % n, t["by"]))
            if self.unlisted:
                fields.append(("more_transactions", self.unlisted))
            # section,verdict,ms,entry: the entry last, as it may hold commas
            for n, (p, e, v, ms) in enumerate(self.runs, 1):
                fields.append(("run%d" % n, b"%s,%s,%d,%s" % (p.encode(), _bytes(v), ms, e)))
            if self.unlisted_runs:
                fields.append(("more_runs", self.unlisted_runs))
            if self.tls_outcome is not None:
                outcome, protocol, cipher, refusal = self.tls_outcome
                fields.append(("tls", outcome))
                if outcome == "ok":
                    fields.append(("tls_protocol", "-" if protocol is None else protocol))
                    fields.append(("tls_cipher", cipher))
                else:
                    fields.append(("tls_reason", refusal))
            # outcome,mechanism,user: the user last, as it may hold commas
            for n, (o, m, u) in enumerate(self.auths, 1):
                fields.append(("auth%d" % n, b"%s,%s,%s" % (o.encode(), m, b"-" if u is None else u)))
            if self.unlisted_auths:
                fields.append(("more_auth", self.unlisted_auths))
        fields.append(("end", end))
        self._write("spp-summary", fields)


def _last_line(reply: bytes) -> bytes:
    # The reply's code is its last line's: a plugin's P lines (250-...) may
    # come before the refusal.
    reply = reply.rstrip(b"\r\n")
    return reply[reply.rfind(b"\n") + 1:]


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _jsonable(value):
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
