"""Where the server is and how to reach it: address, token, TLS / mTLS.

The same settings the `steerserve` CLI reads, so one environment serves both:
    STEERSERVE_ADDRESS          host:port (default 127.0.0.1:50051)
    STEERSERVE_TOKEN            API token, sent as `authorization: Bearer <token>`
    STEERSERVE_CLIENT_TLS=1     TLS with the system's roots
    STEERSERVE_CLIENT_CA_FILE   the CA that signed the server's certificate (implies TLS)
    STEERSERVE_CLIENT_CERT_FILE / STEERSERVE_CLIENT_KEY_FILE   a client certificate for mutual TLS
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Images and adapters travel in messages: allow what the server allows.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ConfigError(ValueError):
    """The client's settings are incomplete or contradictory."""


@dataclass(frozen=True)
class Connection:
    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_env(cls, address: str | None = None, token: str | None = None, *, tls: bool | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 environ=None) -> "Connection":
        """Arguments win over the environment."""
        env = os.environ if environ is None else environ
        ca = ca_file or env.get("STEERSERVE_CLIENT_CA_FILE") or None
        cert = cert_file or env.get("STEERSERVE_CLIENT_CERT_FILE") or None
        key = key_file or env.get("STEERSERVE_CLIENT_KEY_FILE") or None
        if bool(cert) != bool(key):
            raise ConfigError("a client certificate and its key go together "
                              "(STEERSERVE_CLIENT_CERT_FILE and STEERSERVE_CLIENT_KEY_FILE)")
        if tls is None:
            tls = bool(ca or cert) or env.get("STEERSERVE_CLIENT_TLS", "").lower() in ("1", "true", "yes")
        return cls(address=address or env.get("STEERSERVE_ADDRESS") or DEFAULT_ADDRESS,
                   token=token or env.get("STEERSERVE_TOKEN") or None,
                   tls=tls, ca_file=ca, cert_file=cert, key_file=key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.token:
            raise ConfigError("no API token: pass token= or set STEERSERVE_TOKEN")
        return (("authorization", f"Bearer {self.token}"),)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; else TLS (mutual when a client certificate is set)."""
        if not self.tls:
            return None
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]

    def channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.address, options=self.channel_options())
        return grpc.secure_channel(self.address, creds, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.address, options=self.channel_options())
        return grpc.aio.secure_channel(self.address, creds, options=self.channel_options())
