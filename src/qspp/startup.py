"""What a connection learns before its greeting: environment and control files.

Spec §2.2, §2.3 and §3 step 2.  Runs with the cwd already at QMAILHOME.  Any
unreadable control file raises control.ControlError (fatal 421).
"""

from . import control


class Settings:
    __slots__ = ("greeting", "localiphost", "timeout", "rcpthosts", "badmailfrom",
                 "databytes", "relayclient", "remotehost", "remoteip", "localhost",
                 "remoteinfo", "is_local_ip", "auth")


def load(env, auth=None) -> Settings:
    """auth: an authmode.AuthMode, or None when AUTH is off."""
    control.new_connection()
    s = Settings()
    s.auth = auth
    me = control.read_line(b"control/me")
    greeting = control.read_line(b"control/smtpgreeting")
    if greeting is None:
        greeting = me
    if greeting is None:
        raise control.ControlError(b"control/me", 2)
    s.greeting = greeting
    localiphost = control.read_line(b"control/localiphost")
    s.localiphost = me if localiphost is None else localiphost
    s.timeout = control.timeout_smtpd(control.read_int(b"control/timeoutsmtpd", signed=True))
    s.rcpthosts = control.Rcpthosts.load()
    s.badmailfrom = control.Badmailfrom.load(b"control/badmailfrom")
    s.databytes = control.databytes(control.read_int(b"control/databytes"), env.get(b"DATABYTES"))
    s.relayclient = env.get(b"RELAYCLIENT")
    s.remotehost = env.get(b"TCPREMOTEHOST")
    s.remoteip = env.get(b"TCPREMOTEIP", b"unknown")
    s.localhost = env.get(b"TCPLOCALHOST")
    if s.localhost is None:
        s.localhost = env.get(b"TCPLOCALIP", b"unknown")
    s.remoteinfo = env.get(b"TCPREMOTEINFO")
    s.is_local_ip = control.is_local_ip
    return s
