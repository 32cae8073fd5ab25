"""sslserver's certificates, loaded once at start, and the TLS variables they give (README, sslserver).

The environment names what is loaded: CERTFILE (or fehcom's CERTCHAINFILE, which wins), KEYFILE
(empty or unset: the key is in it), CAFILE, CADIR, CCAFILE, CIPHERS, VERIFYDEPTH, DHFILE, and s6's CERTFILE:name /
KEYFILE:name pairs for SNI. Every failure here is fatal at start (exit 111), never per client.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from ucspi.errors import EXIT_TEMPORARY, Fatal, error_text
from ucspi.tls.options import CLIENT_CERT_NONE, TLSOptions

# mod_ssl's DN component names for the names Python's certificate dicts use.
_DN_COMPONENTS = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "title": "T",
    "initials": "I",
    "givenName": "G",
    "surname": "S",
    "description": "D",
    "userId": "UID",
    "emailAddress": "Email",
}
# OpenSSL's short names, for the one-line DN (X509_NAME_oneline: /C=../O=../CN=..) ucspi-ssl sets.
_ONELINE_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "title": "title",
    "initials": "initials",
    "givenName": "GN",
    "surname": "SN",
    "description": "description",
    "userId": "UID",
    "emailAddress": "emailAddress",
}


def _fatal(text: str, error: BaseException | None = None) -> Fatal:
    if isinstance(error, ssl.SSLError):
        text += ": " + ssl_reason(error)
    elif isinstance(error, OSError):
        text += ": " + error_text(error)
    return Fatal(f"sslserver: fatal: {text}", EXIT_TEMPORARY)


def ssl_reason(error: BaseException) -> str:
    """OpenSSL's words for a failure (`wrong version number`), as ucspi-ssl logs them."""
    if isinstance(error, ssl.SSLError):
        if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
            return "certificate verify failed: " + error.verify_message
        text = str(error.args[1]) if len(error.args) > 1 else str(error)
        # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> "wrong version number"
        if "] " in text:
            text = text.split("] ", 1)[1]
        if " (_ssl.c:" in text:
            text = text.split(" (_ssl.c:", 1)[0]
        return text
    if isinstance(error, OSError):
        return error_text(error)
    return type(error).__name__


def one_line_dn(name: tuple) -> str:
    """A certificate dict's subject or issuer as OpenSSL's one-line DN: /O=ucspi tests/CN=localhost."""
    parts = []
    for rdn in name:
        for key, value in rdn:
            parts.append(f"/{_ONELINE_NAMES.get(key, key)}={value}")
    return "".join(parts)


def certificate_variables(prefix: str, decoded: dict, der: bytes | None) -> list[tuple[bytes, bytes]]:
    """mod_ssl's SSL_SERVER_* or SSL_CLIENT_* variables from a decoded certificate."""
    variables: list[tuple[str, str]] = []
    if "version" in decoded:
        variables.append((f"{prefix}_M_VERSION", str(decoded["version"])))
    if "serialNumber" in decoded:
        variables.append((f"{prefix}_M_SERIAL", str(int(decoded["serialNumber"], 16))))
    for which, key in (("S", "subject"), ("I", "issuer")):
        name = decoded.get(key, ())
        variables.append((f"{prefix}_{which}_DN", one_line_dn(name)))
        seen: set[str] = set()
        for rdn in name:
            for attribute, value in rdn:
                component = _DN_COMPONENTS.get(attribute)
                if component is not None and component not in seen:  # the first of a kind, as mod_ssl
                    seen.add(component)
                    variables.append((f"{prefix}_{which}_DN_{component}", value))
    if "notBefore" in decoded:
        variables.append((f"{prefix}_V_START", decoded["notBefore"]))
    if "notAfter" in decoded:
        variables.append((f"{prefix}_V_END", decoded["notAfter"]))
    if der is not None:
        variables.append((f"{prefix}_CERT", ssl.DER_cert_to_PEM_cert(der).strip()))
    return [(os.fsencode(name), os.fsencode(value)) for name, value in variables]


def _first_certificate_der(path: str) -> bytes | None:
    try:
        with open(path, encoding="latin-1") as file:
            text = file.read()
    except OSError:
        return None
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)] + "\n")
    except ValueError:
        return None


@dataclass
class TLSSetup:
    """The contexts (the default one and one per SNI name) and the server's certificate variables."""

    context: ssl.SSLContext
    options: TLSOptions
    server_variables: list[tuple[bytes, bytes]]
    by_name: dict[str, tuple[ssl.SSLContext, list[tuple[bytes, bytes]]]] = field(default_factory=dict)
    # Per cipher name: (algorithm bits), for SSL_CIPHER_ALGKEYSIZE.
    algorithm_bits: dict[str, int] = field(default_factory=dict)

    def for_name(self, name: str | None) -> tuple[ssl.SSLContext, list[tuple[bytes, bytes]]] | None:
        """The SNI name's context: exact, then `*.rest` for one wildcarded first label (as s6)."""
        if name is None or not self.by_name:
            return None
        name = name.lower().rstrip(".")
        found = self.by_name.get(name)
        if found is None and "." in name:
            found = self.by_name.get("*." + name.split(".", 1)[1])
        return found


def read_password_fd3() -> bytes:
    """-3: the key's password from fd 3, up to a NUL or the end (then fd 3 is closed)."""
    data = bytearray()
    try:
        while b"\0" not in data and len(data) < 65536:
            chunk = os.read(3, 4096)
            if not chunk:
                break
            data += chunk
    except OSError as error:
        raise _fatal("unable to read password from fd 3", error) from None
    finally:
        try:
            os.close(3)
        except OSError:
            pass
    return bytes(data).split(b"\0", 1)[0].rstrip(b"\r\n")


def _new_context(options: TLSOptions, environ: dict[bytes, bytes]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_RENEGOTIATION  # a client-driven renegotiation is a CPU lever
    # A FIN without close_notify ends the peer's side as ssl_io takes it; without this, OpenSSL 3
    # makes the session unusable, and the program's last reply (`221 bye`) could not be sent.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ciphers = environ.get(b"CIPHERS")
    if ciphers:  # empty: the library's default, as ucspi-ssl
        try:
            context.set_ciphers(os.fsdecode(ciphers))
        except ssl.SSLError as error:
            raise _fatal("unable to set cipher list", error) from None
    dhfile = environ.get(b"DHFILE")
    if dhfile:
        try:
            context.load_dh_params(os.fsdecode(dhfile))
        except (OSError, ssl.SSLError) as error:
            raise _fatal("unable to load DH parameters", error) from None
    if options.client_cert != CLIENT_CERT_NONE:
        context.verify_mode = ssl.CERT_REQUIRED
        cafile = environ.get(b"CAFILE") or None
        cadir = environ.get(b"CADIR") or None
        if cafile is None and cadir is None:
            raise _fatal("unable to load CA: CAFILE and CADIR unset")
        try:
            context.load_verify_locations(
                os.fsdecode(cafile) if cafile else None, os.fsdecode(cadir) if cadir else None
            )
        except (OSError, ssl.SSLError) as error:
            raise _fatal("unable to load CA", error) from None
    return context


def _load_pair(
    options: TLSOptions,
    environ: dict[bytes, bytes],
    certfile: bytes | None,
    keyfile: bytes | None,
    password: bytes | None,
) -> tuple[ssl.SSLContext, list[tuple[bytes, bytes]]]:
    if not certfile:
        raise _fatal("unable to load certificate: CERTFILE unset")
    cert_path = os.fsdecode(certfile)
    key_path = os.fsdecode(keyfile) if keyfile else cert_path  # empty KEYFILE: the key is in CERTFILE
    der = _first_certificate_der(cert_path)
    if der is None:
        try:
            open(cert_path, "rb").close()
        except OSError as error:
            raise _fatal(f"unable to load certificate {cert_path}", error) from None
        raise _fatal(f"unable to load certificate {cert_path}: no certificate in it")
    try:
        open(key_path, "rb").close()
    except OSError as error:
        raise _fatal(f"unable to load key {key_path}", error) from None
    context = _new_context(options, environ)
    try:
        context.load_cert_chain(cert_path, key_path, password=password if password is not None else None)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or getattr(error, "reason", "") == "KEY_VALUES_MISMATCH":
            raise _fatal("key does not match certificate") from None
        raise _fatal(f"unable to load key {key_path}", error) from None
    except OSError as error:
        raise _fatal(f"unable to load key {key_path}", error) from None
    except TypeError:  # a password-protected key and no -3: OpenSSL would prompt
        raise _fatal(f"unable to load key {key_path}: a password is needed (-3)") from None
    try:
        decoded = ssl._ssl._test_decode_cert(cert_path)  # type: ignore[attr-defined]  # the only decoder 3.11 has
    except Exception:
        decoded = {}
    return context, certificate_variables("SSL_SERVER", decoded, der)


def load(options: TLSOptions, environ: dict[bytes, bytes], password: bytes | None) -> TLSSetup:
    """Every context, or Fatal with ucspi-ssl's words: unable to load certificate / key, key does not match."""
    if password is None:
        # Never a prompt on the terminal: an encrypted key without -3 is a start-up error.
        password = b""
    # fehcom's CERTCHAINFILE (the certificate and its chain) takes precedence over CERTFILE.
    certfile = environ.get(b"CERTCHAINFILE") or environ.get(b"CERTFILE")
    context, server_variables = _load_pair(options, environ, certfile, environ.get(b"KEYFILE"), password)
    setup = TLSSetup(context, options, server_variables)
    for name, certfile in environ.items():
        if not name.startswith(b"CERTFILE:"):
            continue
        server_name = os.fsdecode(name[len(b"CERTFILE:") :]).lower().rstrip(".")
        keyfile = environ.get(b"KEYFILE:" + name[len(b"CERTFILE:") :])
        setup.by_name[server_name] = _load_pair(options, environ, certfile, keyfile, password)

    def on_server_name(sslobj: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        sslobj.ucspi_server_name = server_name  # type: ignore[attr-defined]  # SSL_TLS_SNI_SERVERNAME
        found = setup.for_name(server_name)
        if found is not None:
            sslobj.context = found[0]

    context.sni_callback = on_server_name
    for entry in context.get_ciphers():
        setup.algorithm_bits[entry["name"]] = int(entry.get("alg_bits", 0))
    return setup
