"""A fake qmail-smtpd for the TLS tests: SMTP on fds 0 and 1, AUTH PLAIN only under TLS.

Under TLS means: SSL_PROTOCOL is in the environment (SMTPS through `sslserver -s`), or the
client has done STARTTLS through UCSPI-TLS (`sslserver -n`: SSLCTLFD, SSLREADFD, SSLWRITEFD;
README, sslserver: STARTTLS). STARTTLS is offered when SSLCTLFD is set and TLS is not on yet.
The one account is user `u`, password `p`. QUIT gets `221`, then the program exits 0; EOF on
its input exits 0 too (so a failed handshake after `y` does not leave it hanging).

At STARTTLS it does what careful programs do: it discards plaintext pipelined after the command
(CVE-2011-0411; the count goes to the log), replies `220`, writes its command byte to SSLCTLFD,
and, for `Y`, reads the variables blob (to the double NUL, or to EOF with --blob=eof); with `Y`
it then requires SSL_PROTOCOL in the blob. After STARTTLS the SMTP state starts afresh.

Options (for the corner cases of the tests):
  --log=FILE       one JSON object a line: the environment at start, every command, the blob,
                   the discarded bytes, the end
  --command=BYTE   what to write to SSLCTLFD: Y (default), y, or anything else (an unknown byte)
  --blob=nul|eof   read the Y blob to the double NUL (sslserver style, default) or to EOF (s6 style)
  --byte-first     write the command byte before the 220 reply
  --close-control  at STARTTLS close SSLCTLFD without writing any byte (declining TLS)
Run as `python3 fake_smtpd.py [options]` by the server under test. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import sys

BANNER = b"220 fake.example ESMTP fake_smtpd\r\n"


class Session:
    def __init__(self, arguments: list[str]) -> None:
        self.options = dict(
            argument[2:].split("=", 1) if "=" in argument else (argument[2:], "") for argument in arguments
        )
        self.log_path = self.options.get("log")
        self.input_fd = 0
        self.output_fd = 1
        self.buffer = b""
        self.tls = "SSL_PROTOCOL" in os.environ
        self.starttls_done = False
        self.authenticated = False
        self.mail_from: bytes | None = None
        self.recipients: list[bytes] = []
        self.log(event="start", environment=dict(os.environ), pid=os.getpid())

    def log(self, **fields: object) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(fields, default=lambda value: repr(value)) + "\n")

    # ---------------------------------------------------------------- the wire

    def reply(self, *lines: bytes) -> None:
        data = b"".join(lines)
        while data:
            data = data[os.write(self.output_fd, data) :]

    def line(self) -> bytes | None:
        """The next line (CRLF or LF ended, without it); None at EOF."""
        while b"\n" not in self.buffer:
            try:
                chunk = os.read(self.input_fd, 4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    # ---------------------------------------------------------------- SMTP

    def run(self) -> int:
        self.reply(BANNER)
        while True:
            line = self.line()
            if line is None:
                self.log(event="eof")
                return 0
            self.log(event="command", line=line.decode("latin-1"), tls=self.tls)
            verb, _, argument = line.partition(b" ")
            verb = verb.upper()
            if verb == b"QUIT":
                self.reply(b"221 fake.example bye\r\n")
                self.log(event="quit", control=self.control_state())
                return 0
            handler = getattr(self, "do_" + verb.decode("latin-1"), None)
            if handler is None:
                self.reply(b"502 unimplemented (#5.5.1)\r\n")
                continue
            if handler(argument) is False:
                return 0

    def do_HELO(self, argument: bytes) -> None:
        self.reply(b"250 fake.example\r\n")

    def do_EHLO(self, argument: bytes) -> None:
        lines = [b"fake.example", b"PIPELINING", b"8BITMIME"]
        if self.tls:
            lines.append(b"AUTH PLAIN")
        elif "SSLCTLFD" in os.environ and not self.starttls_done:
            lines.append(b"STARTTLS")
        last = len(lines) - 1
        self.reply(*(b"250" + (b" " if at == last else b"-") + text + b"\r\n" for at, text in enumerate(lines)))

    def do_AUTH(self, argument: bytes) -> None:
        if not self.tls:
            self.reply(b"503 auth not available (#5.3.3)\r\n")
            return
        mechanism, _, initial = argument.partition(b" ")
        if mechanism.upper() != b"PLAIN":
            self.reply(b"504 auth type unimplemented (#5.5.1)\r\n")
            return
        if not initial:
            self.reply(b"334 \r\n")
            initial = self.line() or b""
        try:
            _, user, password = base64.b64decode(initial, validate=True).split(b"\0")
        except ValueError:
            self.reply(b"501 malformed auth input (#5.5.4)\r\n")
            return
        self.authenticated = user == b"u" and password == b"p"
        self.log(event="auth", user=user.decode("latin-1"), ok=self.authenticated)
        self.reply(b"235 ok, go ahead (#2.0.0)\r\n" if self.authenticated else b"535 authorization failed (#5.7.0)\r\n")

    def do_MAIL(self, argument: bytes) -> None:
        self.mail_from = argument
        self.recipients = []
        self.reply(b"250 ok\r\n")

    def do_RCPT(self, argument: bytes) -> None:
        if self.mail_from is None:
            self.reply(b"503 MAIL first (#5.5.1)\r\n")
            return
        self.recipients.append(argument)
        self.reply(b"250 ok\r\n")

    def do_DATA(self, argument: bytes) -> bool | None:
        if not self.recipients:
            self.reply(b"503 RCPT first (#5.5.1)\r\n")
            return None
        self.reply(b"354 go ahead\r\n")
        size = 0
        while True:
            line = self.line()
            if line is None:
                return False
            if line == b".":
                break
            size += len(line) + 2
        self.log(event="message", size=size, authenticated=self.authenticated, tls=self.tls)
        self.reply(b"250 ok queued\r\n")
        self.mail_from, self.recipients = None, []
        return None

    def do_RSET(self, argument: bytes) -> None:
        self.mail_from, self.recipients = None, []
        self.reply(b"250 flushed\r\n")

    def do_NOOP(self, argument: bytes) -> None:
        self.reply(b"250 ok\r\n")

    def do_STARTTLS(self, argument: bytes) -> bool | None:
        control = os.environ.get("SSLCTLFD")
        if control is None or self.starttls_done:
            self.reply(b"502 unimplemented (#5.5.1)\r\n")
            return None
        control_fd = int(control)
        # CVE-2011-0411: what the client pipelined after STARTTLS is plaintext; never act on it.
        self.log(event="discarded", count=len(self.buffer), data=self.buffer.decode("latin-1"))
        self.buffer = b""
        if "close-control" in self.options:
            os.close(control_fd)
            self.reply(b"454 TLS not available (#4.3.0)\r\n")
            self.log(event="declined")
            return None
        command = self.options.get("command", "Y").encode("latin-1")[:1] or b"Y"
        if "byte-first" in self.options:
            os.write(control_fd, command)
            self.reply(b"220 ready to start TLS (#5.7.0)\r\n")
        else:
            self.reply(b"220 ready to start TLS (#5.7.0)\r\n")
            os.write(control_fd, command)
        self.log(event="starttls", command=command.decode("latin-1"))
        if command == b"Y":
            blob = self.read_blob(control_fd, self.options.get("blob", "nul"))
            variables = dict(entry.split(b"=", 1) for entry in blob.split(b"\0") if b"=" in entry)
            self.log(
                event="blob",
                raw=blob.decode("latin-1"),
                variables={name.decode("latin-1"): value.decode("latin-1") for name, value in variables.items()},
            )
            if b"SSL_PROTOCOL" not in variables:
                self.log(event="no SSL_PROTOCOL in the blob")
                return False
        self.input_fd = int(os.environ["SSLREADFD"])
        self.output_fd = int(os.environ["SSLWRITEFD"])
        self.tls = True
        self.starttls_done = True
        self.mail_from, self.recipients, self.authenticated = None, [], False
        return None

    def control_state(self) -> str:
        """What SSLCTLFD holds now, without waiting: "eof" (the server closed it), "open" (nothing to
        read), "data:..." (bytes the server wrote after the blob), "closed" (ours is closed), "none"."""
        control = os.environ.get("SSLCTLFD")
        if control is None:
            return "none"
        try:
            os.set_blocking(int(control), False)
            data = os.read(int(control), 4096)
        except BlockingIOError:
            return "open"
        except ConnectionResetError:
            return "eof"
        except OSError:
            return "closed"
        return "eof" if not data else "data:" + data.decode("latin-1")

    def read_blob(self, control_fd: int, until: str) -> bytes:
        """The Y blob: VAR=value\\0 ... \\0, read to the double NUL (or to EOF); the raw bytes."""
        blob = b""
        while True:
            if until != "eof" and (blob == b"\0" or blob.endswith(b"\0\0")):
                break
            try:
                chunk = os.read(control_fd, 1 if until != "eof" else 4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.log(event="control eof", after=len(blob))
                break
            blob += chunk
        return blob


def main() -> int:
    session = Session(sys.argv[1:])
    try:
        return session.run()
    except BrokenPipeError:
        session.log(event="broken pipe")
        return 0
    finally:
        session.log(event="end")


if __name__ == "__main__":
    sys.exit(main())
