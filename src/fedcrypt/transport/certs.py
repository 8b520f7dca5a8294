"""Certificates for mutual TLS between a deployed server and its clients.

One private CA signs a server certificate and one certificate per client, so that either side
only trusts peers the operator enrolled, and the server can bind each authenticated connection to
a client name (the certificate's common name). Keys are ECDSA P-256, which gRPC's BoringSSL
supports on every platform.

Layout written by :func:`write_bundle`::

    DIR/ca.pem  DIR/ca.key                  the CA (move ca.key offline after enrolling)
    DIR/server.pem  DIR/server.key          the server, SANs for every host it is reached by
    DIR/clients/NAME.pem  DIR/clients/NAME.key

Private keys are created with mode 0600 from the first byte and never overwritten in place.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
RESERVED_NAMES = frozenset({"server", "ca"})  # "ca" would clash with ca.pem in a client's own folder
KEY_MODE = 0o600
CERT_MODE = 0o644

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # backdate notBefore so slightly slow peer clocks accept new certs


class CertError(Exception):
    """A certificate problem the user can fix; the message is one line."""


@dataclass(frozen=True)
class CertBundle:
    """What :func:`write_bundle` did: the folder, whether it created the CA, the files it wrote."""

    out: Path
    ca_created: bool
    written: tuple[Path, ...]

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"


@dataclass(frozen=True)
class TlsFiles:
    """The three files one side of a mutual-TLS connection needs."""

    ca: Path
    cert: Path
    key: Path

    def load(self) -> tuple[bytes, bytes, bytes]:
        """Return (root PEM, private key PEM, cert chain PEM) for ``grpc.ssl_*_credentials``.

        Checks first what gRPC would report cryptically or not at all: missing files, a key
        readable by others, PEM that does not parse, a key that does not belong to the certificate.
        """
        for path in (self.ca, self.cert, self.key):
            if not path.is_file():
                raise CertError(f"{path} not found")
        mode = stat.S_IMODE(self.key.stat().st_mode)
        if os.name != "nt" and mode & 0o077:
            raise CertError(
                f"{self.key} is readable by group or others (mode {mode:04o}); fix: chmod 600 {self.key}"
            )
        root, key_pem, chain = self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        _load_cert(root, self.ca)
        cert = _load_cert(chain, self.cert)
        if not _same_key(cert, _load_key(key_pem, self.key)):
            raise CertError(f"{self.key} is not the private key of {self.cert}")
        return root, key_pem, chain


def create_ca(
    common_name: str = "fedcrypt CA", days: int = 365
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256()), key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    server: bool,
    hosts: Sequence[str] = (),
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate with CN ``name`` signed by the CA, for TLS server or client authentication.

    A server certificate gets one SAN per host (IP literals as IPAddress, others as DNS) and
    needs at least one; a client certificate gets a DNS SAN equal to its name plus any hosts.
    """
    if not name:
        raise CertError("certificate name must not be empty")
    sans = _sans(hosts)
    if server and not sans:
        raise CertError("a server certificate needs at least one host name or IP address")
    if not server:
        sans = [x509.DNSName(name), *(san for san in sans if san != x509.DNSName(name))]
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=False, crl_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def write_bundle(
    out: Path,
    clients: Sequence[str],
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
) -> CertBundle:
    """Create or extend the certificate folder ``out`` (see the module docstring for the layout).

    An existing CA (both ca.pem and ca.key) is reused, never replaced, so previously enrolled
    clients stay valid; an existing server certificate issued by that CA is kept. Files that would
    be replaced (a requested client, an incomplete or foreign server pair) are refused unless
    ``force``. Everything is checked before the first file is written.
    """
    names = check_client_names(clients)
    sans = _sans(hosts)  # reject bad hosts before anything is written
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    out = Path(out)
    ca_paths = (out / "ca.pem", out / "ca.key")
    server_paths = (out / "server.pem", out / "server.key")
    client_paths = {name: (out / "clients" / f"{name}.pem", out / "clients" / f"{name}.key") for name in names}

    ca = _load_ca(*ca_paths)
    make_server = ca is None or _needs_server(ca[0], server_paths, sans, force)
    if make_server and not sans:
        raise CertError("a server certificate needs at least one host name or IP address")
    planned = [*(server_paths if make_server else ()), *(p for pair in client_paths.values() for p in pair)]
    if not force:
        for path in planned:
            if path.exists() or path.is_symlink():
                raise CertError(f"{path} already exists; use --force to replace it")

    written: list[Path] = []
    ca_created = ca is None
    if ca is None:
        ca = create_ca(days=days)
        written += _write_pair(*ca_paths, *ca, force=False)
        log.info("created CA %s", ca_paths[0])
    if make_server:
        cert, key = issue(*ca, "server", server=True, hosts=hosts, days=days)
        written += _write_pair(*server_paths, cert, key, force=force)
    for name, (cert_path, key_path) in client_paths.items():
        cert, key = issue(*ca, name, server=False, days=days)
        written += _write_pair(cert_path, key_path, cert, key, force=force)
    log.info("wrote %d files to %s", len(written), out)
    return CertBundle(out=out, ca_created=ca_created, written=tuple(written))


def check_client_names(clients: Sequence[str]) -> list[str]:
    """The names, checked: allowed characters, not reserved, no duplicates."""
    seen: set[str] = set()
    for name in clients:
        if not _CLIENT_NAME.match(name):
            raise CertError(
                f"invalid client name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if name.lower() in RESERVED_NAMES:
            raise CertError(f"client name {name!r} is reserved")
        if name in seen:
            raise CertError(f"client name {name!r} given twice")
        seen.add(name)
    return list(clients)


def server_files(directory: Path) -> TlsFiles:
    """The server's files in a folder written by :func:`write_bundle`."""
    directory = Path(directory)
    return TlsFiles(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")


def client_files(directory: Path, name: str) -> TlsFiles:
    """A client's files: ``DIR/clients/NAME.*`` (the bundle) or ``DIR/NAME.*`` (a client's own folder)."""
    check_client_names([name])
    directory = Path(directory)
    for folder in (directory / "clients", directory):
        if (folder / f"{name}.pem").is_file():
            return TlsFiles(ca=directory / "ca.pem", cert=folder / f"{name}.pem", key=folder / f"{name}.key")
    raise CertError(
        f"no certificate for client {name!r} in {directory} (looked for clients/{name}.pem and {name}.pem)"
    )


def peer_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate: the name a verified peer was enrolled under."""
    cert = _load_cert(cert_pem, "peer certificate")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CertError("peer certificate has no common name")
    return str(names[0].value)


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for host names and IPv4/IPv6 literals (``[::1]`` accepted), duplicates dropped."""
    sans: list[x509.GeneralName] = []
    for raw in hosts:
        host = raw.strip()
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(literal))
        except ValueError:
            labels = host.rstrip(".").split(".")
            if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
                raise CertError(f"invalid host {raw!r}: expected a DNS name or an IP address") from None
            san = x509.DNSName(host.rstrip("."))
        if san not in sans:
            sans.append(san)
    return sans


def _load_cert(pem: bytes, origin: object) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertError(f"{origin}: not a PEM certificate") from None


def _load_key(pem: bytes, origin: object) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CertError(f"{origin}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{origin}: expected an ECDSA key, got {type(key).__name__}")
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The existing CA, None if there is none; a half-present CA is an error (never replaced)."""
    if not cert_path.exists() and not key_path.exists():
        return None
    if not key_path.exists():
        raise CertError(
            f"{key_path} not found: issuing certificates needs the CA key "
            "(copy it back from where it is kept offline)"
        )
    if not cert_path.exists():
        raise CertError(f"{cert_path} not found but {key_path} exists; restore ca.pem or use a new folder")
    cert = _load_cert(cert_path.read_bytes(), cert_path)
    key = _load_key(key_path.read_bytes(), key_path)
    if not _same_key(cert, key):
        raise CertError(f"{key_path} is not the private key of {cert_path}")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise CertError(f"{cert_path} is not a CA certificate")
    log.info("reusing CA %s", cert_path)
    return cert, key


def _needs_server(
    ca_cert: x509.Certificate, paths: tuple[Path, Path], sans: Sequence[x509.GeneralName], force: bool
) -> bool:
    """Whether the server pair must be (re)issued: forced, missing, incomplete or from another CA."""
    cert_path, key_path = paths
    if force or not (cert_path.is_file() and key_path.is_file()):
        return True
    cert = _load_cert(cert_path.read_bytes(), cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{cert_path} was not issued by this folder's CA; use --force to reissue it") from None
    have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    if have != set(sans):
        log.warning("kept %s, whose hosts differ from the ones requested; use --force to reissue it", cert_path)
    return False


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, force: bool
) -> list[Path]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(key_path, key_pem, KEY_MODE, force=force)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE, force=force)
    return [cert_path, key_path]


def _write_new(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start (O_EXCL: no race, no following a planted symlink).

    With ``force`` an existing file is unlinked first rather than rewritten, so a key never passes
    through the old file's (possibly looser) permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if force:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertError(f"{path} already exists; use --force to replace it") from None
    with os.fdopen(fd, "wb") as handle:
        if mode != KEY_MODE:
            os.fchmod(handle.fileno(), mode)  # certificates are public: 0644 whatever the umask
        handle.write(data)


def tls_or_insecure(certs_dir: Path | None, insecure: bool, files: Callable[[Path], TlsFiles]) -> TlsFiles | None:
    """The TLS files a command's ``--certs`` / ``--insecure`` flags select (None: insecure)."""
    if insecure:
        if certs_dir:
            raise CertError("--insecure and --certs exclude each other")
        return None
    if certs_dir is None:
        raise CertError("TLS needs --certs DIR (create one with `fedcrypt certs`), or pass --insecure on loopback")
    return files(certs_dir)
