"""A program for tcpclient to run: reports as one JSON line what it was given, then exits.

argv: [exit code [bytes to write on fd 7]]. Writes, shuts down the write side, then reads fd 6
to EOF, so the report says what the server sent.
"""

import json
import os
import socket
import sys

exit_code = int(sys.argv[1]) if len(sys.argv) > 1 else 0
send = sys.argv[2].encode() if len(sys.argv) > 2 else b""
with open("/proc/self/environ", "rb") as environ_file:
    environment = environ_file.read().split(b"\0")[:-1]
descriptors = sorted(int(name) for name in os.listdir("/proc/self/fd"))
report: dict = {"environment": [entry.decode("latin-1") for entry in environment], "descriptors": descriptors}
if 6 in descriptors and 7 in descriptors:
    six, seven = os.fstat(6), os.fstat(7)
    report["same_socket"] = (six.st_dev, six.st_ino) == (seven.st_dev, seven.st_ino)
    report["blocking"] = os.get_blocking(6)
    connection = socket.socket(fileno=os.dup(6))
    report["peer"] = list(connection.getpeername()[:2])
    if send:
        os.write(7, send)
    # The server's program reads to EOF before it exits.
    connection.shutdown(socket.SHUT_WR)
    connection.close()
    received = bytearray()
    while chunk := os.read(6, 4096):
        received += chunk
    report["received"] = received.decode("latin-1")
# Our descriptor for /proc/self/fd is gone by now; os.listdir's own was among those listed.
report["descriptors"] = [fd for fd in descriptors if fd in (0, 1, 2) or os.path.exists(f"/proc/self/fd/{fd}")]
print(json.dumps(report))
sys.exit(exit_code)
