"""Every SMTP reply text qspp sends, byte for byte as netqmail 1.06 sends it.

Texts carry no CRLF; the session appends it.  Replies that embed a value (the
greeting, `250 ok T qp P`, spp failures) are built by the small functions below.
"""

# startup, fatal
CONTROLS = b"421 unable to read controls (#4.3.0)"
MY_IP = b"421 unable to figure out my IP addresses (#4.3.0)"
OUT_OF_MEMORY = b"421 out of memory (#4.3.0)"
TIMEOUT = b"451 timeout (#4.4.2)"

# commands
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)"
OK = b"250 ok"
FLUSHED = b"250 flushed"
VRFY = b"252 send some mail, i'll try my best"
HELP = b"214 netqmail home page: http://qmail.org/netqmail"
MAIL_FIRST = b"503 MAIL first (#5.5.1)"
RCPT_FIRST = b"503 RCPT first (#5.5.1)"
SYNTAX = b"555 syntax error (#5.5.4)"
BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
RCPTHOSTS = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
RCPTHOSTS_TLS = (b"553 sorry, that domain isn't in my list of allowed rcpthosts;"
                 b" no valid cert for gatewaying (#5.7.1)")
AUTH_REQUIRED = b"530 Authorization required (#5.7.1) "
GO_AHEAD = b"354 go ahead"

# AUTH (spec §8.2-§8.5)
AUTH_OK = b"235 ok, go ahead (#2.0.0)"
AUTH_FAILED = b"535 authentication failed (#5.7.1)"
AUTH_CANCELED = b"501 auth exchange canceled (#5.0.0)"
AUTH_MALFORMED = b"501 malformed auth input (#5.5.4)"
AUTH_NOT_AVAILABLE = b"503 auth not available (#5.3.3)"
AUTH_ALREADY = b"503 you're already authenticated (#5.5.0)"
AUTH_IN_TRANSACTION = b"503 no auth during mail transaction (#5.5.0)"
AUTH_TYPE = b"504 auth type unimplemented (#5.5.1)"
AUTH_CHILD_CRASHED = b"454 oops, problem with child and I can't auth (#4.3.0)"
AUTH_CHILD_NOSTART = b"454 oops, child won't start and I can't auth (#4.3.0)"
AUTH_NO_PIPE = b"454 oops, unable to open pipe and I can't auth (#4.3.0)"
AUTH_WRITE_PIPE = b"454 oops, unable to write pipe and I can't auth (#4.3.0)"
# FORCETLS (issue 10 #12): no netqmail text exists; RFC 4954's own for code 538
AUTH_ENCRYPTION_REQUIRED = b"538 5.7.11 Encryption required for requested authentication mechanism"

# STARTTLS (spec §8.7)
TLS_READY = b"220 ready for tls"
TLS_NO_PARAMETERS = b"501 Syntax error (no parameters allowed) (#5.5.4)"

# after the message
BARE_LF = b"451 See http://pobox.com/~djb/docs/smtplf.html."
TOO_MANY_HOPS = b"554 too many hops, this message is looping (#5.4.6)"
DATABYTES = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
QQT_FAILURE = b"451 qqt failure (#4.3.0)"

# qmail-queue outcomes (queue.py maps exit codes onto these)
QQ_TOO_LONG = b"554 envelope address too long for qq (#5.1.3)"
QQ_PERM_REJECTED = b"554 mail server permanently rejected message (#5.3.0)"
QQ_PERMANENT = b"554 qq permanent problem (#5.3.0)"
QQ_NOMEM = b"451 qq out of memory (#4.3.0)"
QQ_TIMEOUT = b"451 qq timeout (#4.3.0)"
QQ_WRITE = b"451 qq write error or disk full (#4.3.0)"
QQ_READ = b"451 qq read error (#4.3.0)"
QQ_CONFIG = b"451 qq unable to read configuration (#4.3.0)"
QQ_NETWORK = b"451 qq trouble making network connection (#4.3.0)"
QQ_HOME = b"451 qq trouble in home directory (#4.3.0)"
QQ_QUEUE_FILES = b"451 qq trouble creating files in queue (#4.3.0)"
QQ_TEMP_REJECTED = b"451 mail server temporarily rejected message (#4.3.0)"
QQ_CONN_TIMEOUT = b"451 connection to mail server timed out (#4.4.1)"
QQ_CONN_REJECTED = b"451 connection to mail server rejected (#4.4.1)"
QQ_COMMUNICATION = b"451 communication with mail server failed (#4.4.2)"
QQ_BUG = b"451 qq internal bug (#4.3.0)"
QQ_EXEC = b"451 unable to exec qq (#4.3.0)"
QQ_CRASHED = b"451 qq crashed (#4.3.0)"
QQ_WAITPID = b"451 qq waitpid surprise (#4.3.0)"
QQ_TEMPORARY = b"451 qq temporary problem (#4.3.0)"


def greeting(g: bytes) -> bytes:
    return b"220 " + g + b" ESMTP"


def helo(g: bytes) -> bytes:
    return b"250 " + g


def quit(g: bytes) -> bytes:
    return b"221 " + g


def queued(when: int, pid: int) -> bytes:
    return b"250 ok %d qp %d" % (when, pid)


def tls_missing_certificate(reason: bytes) -> bytes:
    return b"454 TLS missing certificate: " + reason + b" (#4.3.0)"


def tls_cannot_initialize(reason: bytes) -> bytes:
    return b"454 TLS unable to initialize ctx: " + reason + b" (#4.3.0)"


def tls_failed(reason: bytes) -> bytes:
    return b"454 TLS connection failed: " + reason + b" (#4.3.0)"


def spp_failure(entry: bytes, what: bytes) -> bytes:
    return b"451 qmail-spp failure: " + entry + b": " + what + b" (#4.3.0)"


# milters (Postfix's texts for a milter's reject and tempfail, and for
# milter_default_action); a milter's own reply text is sent as it gave it
MILTER_REJECT = b"550 5.7.1 Command rejected"
MILTER_TEMPFAIL = b"451 4.7.1 Service unavailable - try again later"
MILTER_DISCARDED = b"250 ok discarded"
