"""Certificates for mutual TLS: what the bundle contains, how it is extended, and a real gRPC
handshake that accepts an enrolled client and refuses one from another CA."""

from __future__ import annotations

import ipaddress
import os
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedcrypt.cli.certs import certs
from fedcrypt.transport.certs import (
    CertError,
    TlsFiles,
    client_files,
    create_ca,
    issue,
    peer_name,
    server_files,
    write_bundle,
)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def key_matches(cert_path: Path, key_path: Path) -> bool:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return load_cert(cert_path).public_key() == key.public_key()


def snapshot(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundle_certificates_chain_to_the_ca_with_the_specified_names_and_modes(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, ["alice", "bob.lab"], hosts=["localhost", "10.0.0.5", "::1", "fl.example.org"])
    ca = load_cert(tmp_path / "ca.pem")
    assert bundle.ca_created
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    server = load_cert(tmp_path / "server.pem")
    server.verify_directly_issued_by(ca)
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert san(server).get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert san(server).get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]

    for name in ("alice", "bob.lab"):
        cert = load_cert(tmp_path / "clients" / f"{name}.pem")
        cert.verify_directly_issued_by(ca)
        assert cn(cert) == name
        assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert san(cert).get_values_for_type(x509.DNSName) == [name]

    clients = tmp_path / "clients"
    pairs = [("ca", tmp_path), ("server", tmp_path), ("alice", clients), ("bob.lab", clients)]
    for stem, folder in pairs:
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        assert mode(key_path) == 0o600, key_path
        assert mode(cert_path) == 0o644, cert_path
        assert key_matches(cert_path, key_path)
        assert b"BEGIN PRIVATE KEY" in key_path.read_bytes()  # PKCS8, unencrypted
    assert set(bundle.written) == {folder / f"{stem}.{ext}" for stem, folder in pairs for ext in ("pem", "key")}
    assert len({load_cert(folder / f"{stem}.pem").serial_number for stem, folder in pairs}) == 4


def test_key_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_bundle(tmp_path, ["a"])
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == mode(tmp_path / "clients" / "a.key") == 0o600
    assert mode(tmp_path / "ca.pem") == 0o644


def test_existing_files_are_refused_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["a"])
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match=r"clients/a\.pem already exists.*--force"):
        write_bundle(tmp_path, ["a"])
    assert snapshot(tmp_path) == before

    ca_fingerprint = load_cert(tmp_path / "ca.pem").fingerprint(hashes.SHA256())
    bundle = write_bundle(tmp_path, ["a"], force=True)
    assert not bundle.ca_created
    assert load_cert(tmp_path / "ca.pem").fingerprint(hashes.SHA256()) == ca_fingerprint
    assert (tmp_path / "clients" / "a.key").read_bytes() != before[tmp_path / "clients" / "a.key"][1]
    assert mode(tmp_path / "clients" / "a.key") == 0o600
    load_cert(tmp_path / "clients" / "a.pem").verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))


def test_adding_a_client_reuses_the_ca_and_leaves_the_other_files_untouched(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["a", "b"])
    before = snapshot(tmp_path)
    bundle = write_bundle(tmp_path, ["d"])
    assert not bundle.ca_created
    assert bundle.written == (tmp_path / "clients" / "d.pem", tmp_path / "clients" / "d.key")
    after = snapshot(tmp_path)
    assert {p: after[p] for p in before} == before
    load_cert(tmp_path / "clients" / "d.pem").verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))


def test_missing_server_pair_is_recreated_and_missing_ca_key_is_an_error(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["a"])
    (tmp_path / "server.pem").unlink()
    (tmp_path / "server.key").unlink()
    bundle = write_bundle(tmp_path, ["b"])
    assert tmp_path / "server.pem" in bundle.written
    load_cert(tmp_path / "server.pem").verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))

    (tmp_path / "ca.key").unlink()  # moved offline, as advised
    with pytest.raises(CertError, match=r"ca\.key not found"):
        write_bundle(tmp_path, ["c"], force=True)
    assert not (tmp_path / "clients" / "c.pem").exists()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["-dash"], "invalid client name"),
        (["a b"], "invalid client name"),
        (["x" * 65], "invalid client name"),
        ([""], "invalid client name"),
        (["a/b"], "invalid client name"),
        (["server"], "reserved"),
        (["a", "b", "a"], "given twice"),
    ],
)
def test_bad_client_names_are_refused_before_anything_is_written(
    tmp_path: Path, names: list[str], message: str
) -> None:
    with pytest.raises(CertError, match=message):
        write_bundle(tmp_path / "out", names)
    assert not (tmp_path / "out").exists()


def test_bad_hosts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="invalid host"):
        write_bundle(tmp_path, ["a"], hosts=["localhost", "bad host"])
    with pytest.raises(CertError, match="at least one host"):
        write_bundle(tmp_path, ["a"], hosts=[])
    assert not (tmp_path / "ca.key").exists()


def test_tls_files_load_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["a"])
    files = client_files(tmp_path, "a")
    root, key, chain = files.load()
    assert root == (tmp_path / "ca.pem").read_bytes() and b"PRIVATE KEY" in key and b"CERTIFICATE" in chain
    files.key.chmod(0o644)
    with pytest.raises(CertError, match=r"a\.key is readable.*chmod 600 .*a\.key"):
        files.load()
    with pytest.raises(CertError, match=r"nope\.pem not found"):
        TlsFiles(ca=files.ca, cert=tmp_path / "nope.pem", key=files.key).load()
    with pytest.raises(CertError, match="not the private key"):
        TlsFiles(ca=files.ca, cert=tmp_path / "server.pem", key=tmp_path / "ca.key").load()


def test_client_files_accepts_the_bundle_and_a_client_only_folder(tmp_path: Path) -> None:
    write_bundle(tmp_path / "bundle", ["a"])
    own = tmp_path / "own"
    own.mkdir()
    for src, name in (("ca.pem", "ca.pem"), ("clients/a.pem", "a.pem"), ("clients/a.key", "a.key")):
        (own / name).write_bytes((tmp_path / "bundle" / src).read_bytes())
    (own / "a.key").chmod(0o600)
    assert client_files(tmp_path / "bundle", "a").cert == tmp_path / "bundle" / "clients" / "a.pem"
    assert client_files(own, "a") == TlsFiles(ca=own / "ca.pem", cert=own / "a.pem", key=own / "a.key")
    assert client_files(own, "a").load()[2] == (own / "a.pem").read_bytes()
    with pytest.raises(CertError, match="no certificate for client 'b'"):
        client_files(own, "b")


def test_peer_name_returns_the_common_name(tmp_path: Path) -> None:
    write_bundle(tmp_path, ["carol"])
    assert peer_name((tmp_path / "clients" / "carol.pem").read_bytes()) == "carol"
    with pytest.raises(CertError):
        peer_name(b"not a certificate")


def _echo_peer(request: bytes, context: grpc.ServicerContext) -> bytes:
    return context.auth_context()["x509_common_name"][0]


def _call(port: int, files: tuple[bytes, bytes, bytes]) -> bytes:
    root, key, chain = files
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    # no proxy: an http_proxy in the environment must not intercept a loopback test
    with grpc.secure_channel(f"localhost:{port}", credentials, options=[("grpc.enable_http_proxy", 0)]) as channel:
        return channel.unary_unary("/t.T/Echo")(b"hi", timeout=5)


def test_mutual_tls_handshake_accepts_enrolled_clients_and_refuses_a_foreign_ca(tmp_path: Path) -> None:
    write_bundle(tmp_path / "pki", ["alice"])
    root, key, chain = server_files(tmp_path / "pki").load()
    alice = client_files(tmp_path / "pki", "alice").load()

    other_ca, other_ca_key = create_ca("intruder CA")
    mallory_cert, mallory_key = issue(other_ca, other_ca_key, "alice", server=False)
    mallory = (
        root,  # trusts the real CA, so only the server's check of the client certificate can refuse it
        mallory_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        mallory_cert.public_bytes(serialization.Encoding.PEM),
    )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(_echo_peer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Echo": handler}),))
    credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=root, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        assert _call(port, alice) == b"alice"
        with pytest.raises(grpc.RpcError) as refused:
            _call(port, mallory)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as untrusted:  # and the client refuses a server it cannot verify
            _call(port, (other_ca.public_bytes(serialization.Encoding.PEM), *alice[1:]))
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_cli_writes_the_files_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(certs)
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    result = runner.invoke(app, ["--out", str(tmp_path), "--clients", "a,b", "--hosts", "localhost,::1"], env=env)
    assert result.exit_code == 0, result.output
    assert "0600" in result.output and "0644" in result.output and "offline" in result.output
    assert (tmp_path / "clients" / "b.key").exists()

    result = runner.invoke(app, ["--out", str(tmp_path), "--clients", "a"], env=env)
    assert result.exit_code == 2
    assert "error:" in result.output and "already exists" in result.output
    assert "Traceback" not in result.output
