"""TLS tests (issue 14): sslserver against real clients, hostile input, and their fixtures.

A package, so that this directory's conftest.py does not shadow tests/conftest.py (both would be
the top-level module `conftest` otherwise). Modules here import each other as `tls.certs`,
`tls.tlsclient`; tests/conftest.py stays `conftest`.
"""
