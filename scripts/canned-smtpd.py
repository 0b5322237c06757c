"""The benchmark floor: an SMTP responder that only prints canned replies.

It speaks just enough SMTP for scripts/bench's client (greeting, 250 to every
command, 354 then 250 around a message, 221 at QUIT), with no control files,
no checks and no queue, so its cost is the interpreter start plus a few reads
and writes: what any Python program under tcpserver must pay.
"""
import os


def main():
    out = [b"220 canned ESMTP\r\n"]
    buf = b""
    in_data = False
    while True:
        if out:
            os.write(1, b"".join(out))
            out = []
        chunk = os.read(0, 65536)
        if not chunk:
            os._exit(1)
        buf += chunk
        while True:
            lf = buf.find(b"\n")
            if lf < 0:
                break
            line, buf = buf[:lf + 1], buf[lf + 1:]
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    out.append(b"250 ok 1 qp 1\r\n")
            elif line[:4].upper() == b"DATA":
                in_data = True
                out.append(b"354 go ahead\r\n")
            elif line[:4].upper() == b"QUIT":
                os.write(1, b"".join(out) + b"221 canned\r\n")
                os._exit(0)
            else:
                out.append(b"250 ok\r\n")


main()
