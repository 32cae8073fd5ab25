"""A client that asks for KeyUpdates and never reads (ucspi/tls/relay.py's bounded buffers).

Each KeyUpdate(update_requested) a client sends makes the server answer with a KeyUpdate of its
own. The relay kept reading the socket whatever it had still to send, so a client that sent
them (with a byte of data between, which resets OpenSSL's count of them in a row) and never read
grew the server's outgoing buffer without bound: the socket is now read only while that buffer
has room, and the client's sends stall instead.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IN_CI, needs_tool

from tls.certs import Certificates
from tls.tlsclient import rss_kib, start_sslserver

GCC = needs_tool("gcc", "gcc libssl-dev")

CLIENT = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* PORT COUNT: KeyUpdate(update_requested) and one byte, COUNT times or until a send stalls 1 s;
 * prints how many went, then holds the connection open, never reading. */
int main(int argc, char **argv) {
    int port = atoi(argv[1]);
    long count = atol(argv[2]), i;
    int fd = socket(AF_INET, SOCK_STREAM, 0), small = 4096;
    struct sockaddr_in address = {0};
    struct timeval timeout = {1, 0};
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    SSL *ssl;

    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small); /* little room for the answers */
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) { perror("connect"); return 2; }
    SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION);
    ssl = SSL_new(context);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) { fprintf(stderr, "handshake failed\n"); return 2; }
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    for (i = 0; i < count; i++)
        if (SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) != 1 || SSL_write(ssl, "x", 1) != 1)
            break;
    printf("%ld\n", i);
    fflush(stdout);
    pause();
    return 0;
}
"""


@pytest.fixture(scope="module")
def key_update_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path("/usr/include/openssl/ssl.h").exists() or shutil.which("gcc") is None:
        # .ci/run installs both: there a missing one is a failure, as needs_tool makes it.
        if IN_CI:
            pytest.fail("needs gcc and libssl-dev (.ci/run installs them)")
        pytest.skip("needs gcc and libssl-dev")
    directory = tmp_path_factory.mktemp("key_updates")
    (directory / "client.c").write_text(CLIENT)
    binary = directory / "client"
    subprocess.run(["gcc", "-O2", "-o", binary, directory / "client.c", "-lssl", "-lcrypto"], check=True, timeout=60)
    return binary


@GCC
def test_key_updates_unread_do_not_grow_the_server(tls_certs: Certificates, key_update_client: Path) -> None:
    server = start_sslserver([], ["sh", "-c", "exec cat >/dev/null"], tls_certs.environment())
    client = None
    try:
        before = rss_kib(server.pid)
        count = 400_000  # about 20 MB sent, 11 MB of answers
        client = subprocess.Popen([key_update_client, str(server.port), str(count)], stdout=subprocess.PIPE)
        assert client.stdout is not None
        sent = int(client.stdout.readline() or b"-1")
        time.sleep(0.3)
        grown = rss_kib(server.pid) - before
        print(f"sent {sent} of {count}; the server grew {grown} KiB")
        assert sent >= 0
        assert grown < 4096, f"the server grew {grown} KiB holding answers nobody reads ({sent} sent)"
        assert server.process.poll() is None
    finally:
        if client is not None:
            client.kill()
            client.wait(5)
        server.stop()


def test_a_client_that_reads_only_after_its_upload_gets_everything(tls_certs: Certificates) -> None:
    """The bound above is on OpenSSL's own answers: the program's output, stalled at the client,
    never stops the upload (a full-duplex program, a client that reads when it has sent all)."""
    program = ["sh", "-c", "head -c 3000000 /dev/zero & cat >/dev/null; wait"]
    server = start_sslserver([], program, tls_certs.environment())
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer waits on our side
        raw.settimeout(10)
        raw.connect(("127.0.0.1", server.port))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw) as client:
            time.sleep(0.5)  # the program's output fills every buffer up to the relay's
            client.sendall(bytes(4_000_000))  # stalls for ever if the upload is not read
            received = 0
            while received < 3_000_000:
                data = client.recv(65536)
                if not data:
                    break
                received += len(data)
            assert received == 3_000_000
    finally:
        server.stop()
