"""SPPLOG: one stderr line per plugin run and a summary per connection (spp.md §6.5).

Imported only when SPPLOG is set, so a normal connection pays nothing.  Lines
keep the common `qspp: pid PID: ` prefix; the text after it is `key=value`
pairs, or one JSON object with `SPPLOG=json`.
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
    # quoted so a parser can split the line at spaces; \ and " escaped
    return '"%s"' % _text(raw).replace("\\", "\\\\").replace('"', '\\"')


# The summary names at most this many transactions, and recipients in each; the
# rest are only counted, so a client cannot grow the journal without bound.
MAX_LISTED = 100


class Journal:
    """Collects what the summary line reports; writes the run lines at once."""

    def __init__(self, mode: bytes):
        self.json = mode == b"json"
        self.transactions = []
        self.unlisted = 0
        self.current = None

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

    # -- the transaction trail for the summary -------------------------------

    def mail(self, sender: bytes, reply: bytes, by: bytes) -> None:
        # an accepted MAIL has no outcome until DATA gives it one
        refused = not reply.startswith(b"250")
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
                self.current["rcpt"].append((recipient, reply[:3], by))

    def message(self, size, reply: bytes, by: bytes) -> None:
        if self.current is not None:
            self.current["bytes"] = size
            self.current["outcome"] = reply
            self.current["by"] = by

    def summary(self, settings, helo, end: str) -> None:
        fields = [("ip", settings.remoteip), ("host", settings.remotehost or b"unknown"),
                  ("helo", b"-" if helo is None else helo)]
        if self.json:
            fields.append(("transactions", [
                {"from": t["from"],
                 "rcpt": [{"to": r, "reply": c, "by": b} for r, c, b in t["rcpt"]],
                 "more_rcpt": t["unlisted"],
                 "bytes": t["bytes"], "outcome": t["outcome"], "by": t["by"]}
                for t in self.transactions]))
            fields.append(("more_transactions", self.unlisted))
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
                fields.append(("by%d" % n, t["by"]))
        if self.unlisted and not self.json:
            fields.append(("more_transactions", self.unlisted))
        fields.append(("end", end))
        self._write("spp-summary", fields)


def _jsonable(value):
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
