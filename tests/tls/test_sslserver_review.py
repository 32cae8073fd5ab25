"""Review of sslserver (issue 14): ALRM's drain, -n's bounded wait for the control byte, the
command's name in its start-up messages, a truncation logged at -v, the end event's dur_ms."""

from __future__ import annotations

import re

from tls.certs import Certificates
from tls.tlsclient import TlsClient, start_sslserver


def test_the_end_event_has_dur_ms_in_the_structured_modes(tls_certs: Certificates) -> None:
    with start_sslserver(["-v", "--log=logfmt"], ["echo", "hi"], tls_certs.environment()) as server:
        with TlsClient(server.port) as client:
            client.handshake()
            assert client.read_all().data == b"hi\n"
        (line,) = server.wait_for_log(r"ev=end ")
    assert re.search(rb" dur_ms=\d+", line), line
