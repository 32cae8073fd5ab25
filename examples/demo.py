"""`make demo`: compile examples/tcp.smtp, ask tcprulescheck about three clients, then serve.

Starts tcpserver on 127.0.0.1 (a free port) with the compiled rules and examples/show-environment
as the program, connects once, prints what the client read and the server's log, and stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BIN = TOP / "bin"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ucspi-demo-") as scratch:
        cdb = Path(scratch) / "tcp.smtp.cdb"
        rules = TOP / "examples" / "tcp.smtp"
        print(f"$ tcprules tcp.smtp.cdb tcp.smtp.tmp < {rules.relative_to(TOP)}")
        with rules.open("rb") as source:
            subprocess.run([BIN / "tcprules", cdb, Path(scratch) / "tcp.smtp.tmp"], stdin=source, check=True)
        for ip in ("127.0.0.1", "192.168.10.5", "10.1.1.1"):
            print(f"\n$ TCPREMOTEIP={ip} tcprulescheck tcp.smtp.cdb")
            sys.stdout.flush()
            subprocess.run([BIN / "tcprulescheck", cdb], env={**os.environ, "TCPREMOTEIP": ip}, check=True)

        command = ["-v", "-1", "-H", "-R", "-l", "localhost", "-x", str(cdb), "127.0.0.1", "0"]
        program = TOP / "examples" / "show-environment"
        print(f"\n$ tcpserver {' '.join(command)} {program.relative_to(TOP)} &")
        log_path = Path(scratch) / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen([BIN / "tcpserver", *command, program], stdout=subprocess.PIPE, stderr=log)
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline())
                print(f"(listening on 127.0.0.1 port {port})\n\n$ connect to 127.0.0.1:{port}")
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    received = b""
                    while chunk := client.recv(4096):
                        received += chunk
                print(received.decode(errors="replace"), end="")
                time.sleep(0.3)  # let the server log the child's end
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=10)
        print("\nThe server's log (fd 2, -v):")
        print(log_path.read_text(errors="replace"), end="")


if __name__ == "__main__":
    main()
