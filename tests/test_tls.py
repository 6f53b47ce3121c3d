"""TLS and mutual TLS on the gRPC port (certificates made here with openssl), and API keys stored as
sha256 digests."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.config import Settings
from service.gateway.auth import Authenticator
from service.gateway.errors import ServiceError
from tests.conftest import TOKENS, auth, required_tool, start_gateway_in_thread, stop_gateway


def openssl(*args, cwd):
    subprocess.run([required_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, ext: str):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return d


def read(d: Path, name: str) -> bytes:
    return (d / name).read_bytes()


def info(channel: grpc.Channel, token: str = "token-alice"):
    return pb_grpc.SteerServeStub(channel).GetServerInfo(pb.GetServerInfoRequest(), metadata=auth(token), timeout=10)


def gateway_settings(tmp_path, certs, **tls) -> Settings:
    return Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, api_keys=dict(TOKENS), data_dir=tmp_path,
                    tls_cert_file=certs / "server.pem", tls_key_file=certs / "server.key", **tls)


def test_tls_serves_encrypted_and_refuses_plaintext(tmp_path, certs):
    running = start_gateway_in_thread(gateway_settings(tmp_path, certs))
    try:
        secure = grpc.secure_channel(running.address, grpc.ssl_channel_credentials(read(certs, "ca.pem")))
        assert info(secure).backend == "inprocess"
        with pytest.raises(grpc.RpcError) as err:
            info(grpc.insecure_channel(running.address))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA does not connect.
        untrusting = grpc.secure_channel(running.address, grpc.ssl_channel_credentials(read(certs, "rogue-ca.pem")))
        with pytest.raises(grpc.RpcError) as err:
            info(untrusting)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_gateway(running)


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(tmp_path, certs, monkeypatch, capsys):
    running = start_gateway_in_thread(gateway_settings(tmp_path, certs, tls_client_ca_file=certs / "ca.pem"))
    ca = read(certs, "ca.pem")

    def channel(name=None):
        if name is None:
            return grpc.secure_channel(running.address, grpc.ssl_channel_credentials(ca))
        return grpc.secure_channel(running.address, grpc.ssl_channel_credentials(
            ca, private_key=read(certs, f"{name}.key"), certificate_chain=read(certs, f"{name}.pem")))

    try:
        assert info(channel("client")).backend == "inprocess"
        for name in (None, "rogue"):  # no certificate; one signed by another CA
            with pytest.raises(grpc.RpcError) as err:
                info(channel(name))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
        # The certificate gets a client onto the port; the API token still decides the tenant.
        with pytest.raises(grpc.RpcError) as err:
            info(channel("client"), token="not-a-token")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The CLI client speaks TLS from its environment.
        from service.cli import main

        cli = ["adapters", "--address", running.address, "--token", "token-alice", "list"]
        monkeypatch.setenv("STEERSERVE_CLIENT_CA_FILE", str(certs / "ca.pem"))
        assert main(cli) == 1 and "UNAVAILABLE" in capsys.readouterr().err  # no client certificate
        monkeypatch.setenv("STEERSERVE_CLIENT_CERT_FILE", str(certs / "client.pem"))
        monkeypatch.setenv("STEERSERVE_CLIENT_KEY_FILE", str(certs / "client.key"))
        assert main(cli) == 0
    finally:
        stop_gateway(running)


def test_tls_settings_are_checked(tmp_path, certs):
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert_file=certs / "server.pem")
    with pytest.raises(ValueError, match="needs STEERSERVE_TLS_CERT_FILE"):
        Settings(tls_client_ca_file=certs / "ca.pem")
    with pytest.raises(ValueError, match="not a readable file"):
        Settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=certs / "server.key")


def test_api_keys_can_be_stored_as_sha256_digests(monkeypatch):
    digest = hashlib.sha256(b"token-carol").hexdigest()
    monkeypatch.setenv("STEERSERVE_API_KEYS", f"sha256:{digest}:carol,token-dan:dan")
    authenticator = Authenticator(Settings().api_keys)
    assert authenticator.tenant_for([("authorization", "Bearer token-carol")]) == "carol"
    assert authenticator.tenant_for([("authorization", "Bearer token-dan")]) == "dan"
    for token in (f"sha256:{digest}", digest, "token-caro"):  # the digest itself is not a token
        with pytest.raises(ServiceError) as err:
            authenticator.tenant_for([("authorization", f"Bearer {token}")])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="64 hex digits"):
        Authenticator({"sha256:abc": "x"})


def test_hash_token_command_prints_the_digest(monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("token-carol\n"))
    assert main(["hash-token"]) == 0
    assert capsys.readouterr().out.strip() == "sha256:" + hashlib.sha256(b"token-carol").hexdigest()


def test_api_key_entries_parse_as_before_and_are_checked(monkeypatch):
    monkeypatch.setenv("STEERSERVE_API_KEYS", "tok:org:team")  # the first ":" ends a plain token
    assert Settings().api_keys == {"tok": "org:team"}
    digest = hashlib.sha256(b"tok").hexdigest()
    monkeypatch.setenv("STEERSERVE_API_KEYS", f"tok:a,sha256:{digest}:b")  # one token twice
    with pytest.raises(ValueError, match="one token twice"):
        Settings()
    monkeypatch.setenv("STEERSERVE_API_KEYS", "sha256:abcd:a")
    with pytest.raises(ValueError):
        Settings()


def test_cli_client_certificate_needs_its_key(monkeypatch, certs):
    from service.cli import main

    monkeypatch.setenv("STEERSERVE_CLIENT_CERT_FILE", str(certs / "client.pem"))
    with pytest.raises(SystemExit, match="go together"):
        main(["adapters", "--address", "127.0.0.1:1", "--token", "t", "list"])
