"""Settings from the environment and from a JSON config file."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.gateway.server import ensure_dev_token


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("STEERSERVE_API_KEYS", "tok1:tenant-a, tok2:tenant-b")
    monkeypatch.setenv("STEERSERVE_GRPC_PORT", "6000")
    s = Settings()
    assert s.api_keys == {"tok1": "tenant-a", "tok2": "tenant-b"}
    assert s.grpc_port == 6000


def test_malformed_api_keys_are_refused(monkeypatch):
    monkeypatch.setenv("STEERSERVE_API_KEYS", "just-a-token")
    with pytest.raises(ValidationError, match="token:tenant"):
        Settings()


def test_config_file_with_environment_override(monkeypatch, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"api_keys": {"filetok": "t"}, "max_steps": 10, "grpc_port": 7000}))
    monkeypatch.setenv("STEERSERVE_CONFIG_FILE", str(path))
    monkeypatch.setenv("STEERSERVE_GRPC_PORT", "7001")
    s = Settings()
    assert s.api_keys == {"filetok": "t"} and s.max_steps == 10 and s.grpc_port == 7001


def test_dev_token_only_without_configured_keys():
    s = Settings(dev_token=True)
    token = ensure_dev_token(s)
    assert token and s.api_keys == {token: "dev"}
    configured = Settings(dev_token=True, api_keys={"k": "t"})
    assert ensure_dev_token(configured) is None and configured.api_keys == {"k": "t"}
