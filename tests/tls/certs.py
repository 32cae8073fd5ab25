"""Certificates for the TLS tests, made with Debian's openssl at test time (no key is committed).

make_certificates(directory) writes, in directory:
- a test CA (ECDSA P-256) and a second, untrusted one;
- server certificates signed by the CA, ECDSA P-256 and RSA-2048, CN=localhost with
  SAN DNS:localhost, IP:127.0.0.1, IP:::1;
- the ECDSA and RSA ones again as key-in-cert combined PEMs (for KEYFILE empty);
- a key that matches neither (`key does not match certificate`);
- the ECDSA server key encrypted with a password (for -3);
- a client certificate signed by the CA (CN=localhost, SAN DNS:localhost and IP:127.0.0.1, an
  emailAddress in the subject), one signed by the CA for another name (-z mismatch), and one
  signed by the untrusted CA.
It returns their paths as a Certificates. Every openssl run is bounded in time.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"
DAYS = "30"
PASSWORD = b"sesame-1234"  # the encrypted key's password (what -3 reads from fd 3, NUL-terminated)
CLIENT_EMAIL = "client@example.test"
SERVER_SAN = "DNS:localhost,IP:127.0.0.1,IP:::1"
CLIENT_SAN = "DNS:localhost,IP:127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """Paths of everything make_certificates wrote; *_key files are PEM private keys."""

    directory: Path
    ca: Path  # the trusted CA's certificate: CAFILE for the server, cafile for the clients
    ca_key: Path
    untrusted_ca: Path
    ec_cert: Path
    ec_key: Path
    rsa_cert: Path
    rsa_key: Path
    ec_combined: Path  # ECDSA certificate and key in one file
    rsa_combined: Path
    wrong_key: Path  # an ECDSA P-256 key that matches no certificate here
    encrypted_key: Path  # ec_key under PASSWORD (AES-256)
    password: bytes
    client_cert: Path  # signed by ca, CN=localhost
    client_key: Path
    other_client_cert: Path  # signed by ca, CN=other.example.test: a host-name mismatch for -z
    other_client_key: Path
    untrusted_client_cert: Path  # signed by untrusted_ca
    untrusted_client_key: Path

    def server(self, kind: str = "ec") -> tuple[Path, Path]:
        """(CERTFILE, KEYFILE) of the "ec" or "rsa" server certificate."""
        if kind == "ec":
            return self.ec_cert, self.ec_key
        if kind == "rsa":
            return self.rsa_cert, self.rsa_key
        raise ValueError(kind)

    def environment(self, kind: str = "ec", **extra: str | os.PathLike[str]) -> dict[bytes, bytes]:
        """CERTFILE and KEYFILE of that certificate, plus extra NAME=value (CAFILE=certs.ca, ...)."""
        cert, key = self.server(kind)
        variables = {b"CERTFILE": os.fsencode(cert), b"KEYFILE": os.fsencode(key)}
        variables.update({name.encode(): os.fsencode(value) for name, value in extra.items()})
        return variables


def _openssl(*arguments: str | os.PathLike[str], cwd: Path, stdin: bytes = b"") -> None:
    result = subprocess.run(
        [OPENSSL, *(os.fspath(argument) for argument in arguments)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, arguments))} failed: {result.stderr.decode(errors='replace')}")


def _key(path: Path, kind: str, cwd: Path) -> Path:
    if kind == "ec":
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path, cwd=cwd)
    else:
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path, cwd=cwd)
    os.chmod(path, 0o600)
    return path


def _ca(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key", "ec", directory)
    cert = directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", DAYS, "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, kind: str, subject: str, san: str, usage: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    """A key of that kind and a certificate for it signed by ca, with these extensions."""
    key = _key(directory / f"{name}.key", kind, directory)
    request = directory / f"{name}.csr"
    _openssl("req", "-new", "-key", key, "-subj", subject, "-out", request, cwd=directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        f"subjectAltName={san}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    cert = directory / f"{name}.pem"
    # A random serial, so that no .srl file is shared between certificates.
    serial = "0x" + os.urandom(8).hex()
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", serial,
        "-days", DAYS, "-sha256", "-extfile", extensions, "-out", cert,
        cwd=directory,
    )  # fmt: skip
    request.unlink()
    extensions.unlink()
    return cert, key


def _combined(path: Path, cert: Path, key: Path) -> Path:
    path.write_bytes(cert.read_bytes() + key.read_bytes())
    os.chmod(path, 0o600)
    return path


def make_certificates(directory: str | os.PathLike[str]) -> Certificates:
    """Everything the module docstring lists, in directory (made if need be)."""
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    ca = _ca(where, "ca", "/O=ucspi tests/CN=ucspi test CA")
    untrusted = _ca(where, "untrusted-ca", "/O=elsewhere/CN=untrusted test CA")
    server_usage = "serverAuth"
    ec = _signed(where, "server-ec", "ec", "/O=ucspi tests/CN=localhost", SERVER_SAN, server_usage, ca)
    rsa = _signed(where, "server-rsa", "rsa", "/O=ucspi tests/CN=localhost", SERVER_SAN, server_usage, ca)
    client_subject = f"/O=ucspi tests/CN=localhost/emailAddress={CLIENT_EMAIL}"
    client = _signed(where, "client", "ec", client_subject, CLIENT_SAN, "clientAuth", ca)
    other = _signed(
        where, "client-other", "ec", "/O=ucspi tests/CN=other.example.test", "DNS:other.example.test", "clientAuth", ca
    )
    stranger = _signed(
        where, "client-untrusted", "ec", "/O=elsewhere/CN=localhost", CLIENT_SAN, "clientAuth", untrusted
    )
    wrong_key = _key(where / "wrong.key", "ec", where)
    encrypted_key = where / "server-ec-encrypted.key"
    _openssl(
        "pkey", "-in", ec[1], "-aes256", "-passout", "fd:0", "-out", encrypted_key, cwd=where, stdin=PASSWORD + b"\n"
    )
    os.chmod(encrypted_key, 0o600)
    return Certificates(
        directory=where,
        ca=ca[0],
        ca_key=ca[1],
        untrusted_ca=untrusted[0],
        ec_cert=ec[0],
        ec_key=ec[1],
        rsa_cert=rsa[0],
        rsa_key=rsa[1],
        ec_combined=_combined(where / "server-ec-combined.pem", *ec),
        rsa_combined=_combined(where / "server-rsa-combined.pem", *rsa),
        wrong_key=wrong_key,
        encrypted_key=encrypted_key,
        password=PASSWORD,
        client_cert=client[0],
        client_key=client[1],
        other_client_cert=other[0],
        other_client_key=other[1],
        untrusted_client_cert=stranger[0],
        untrusted_client_key=stranger[1],
    )


if __name__ == "__main__":  # make a set by hand: python tests/tls/certs.py DIRECTORY
    import sys

    print(make_certificates(sys.argv[1]))
