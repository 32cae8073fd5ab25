"""Fixtures of the TLS tests: the certificates (tls.certs), made once per session with openssl."""

from __future__ import annotations

import pytest
from conftest import needs_tool  # tests/conftest.py

from tls.certs import Certificates, make_certificates

_OPENSSL = needs_tool("openssl", "openssl")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """The CA, server, client and broken certificates of tls.certs, in a session directory.
    Without openssl: a skip naming its package, or a failure under CI=true (needs_tool)."""
    (missing,) = _OPENSSL.args
    if missing:
        pytest.skip(_OPENSSL.kwargs["reason"])
    return make_certificates(tmp_path_factory.mktemp("tls-certs"))
