"""The public proto passes `buf lint` and has no breaking change against the last released API.

buf (pinned, from npm) is installed by `scripts/setup.sh --test` into var/tools/; $BUF overrides
the path. Config: buf.yaml (lint STANDARD minus the rules the released v1 names cannot meet;
breaking FILE). The released APIs are snapshots under api/released/v<version>/ (see its README).
Without buf these tests FAIL, not skip: CI must not pass without checking the API.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

# buf runs as a separate process, like promtool in test_metrics_lint.
pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "api" / "released"
PROTO_REL = Path("proto/steerserve/v1/steerserve.proto")


def _buf() -> str:
    path = os.environ.get("BUF") or str(ROOT / "var" / "tools" / "node_modules" / ".bin" / "buf")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"buf not installed at {path}: run scripts/setup.sh --test (installs it with npm "
                    "into var/tools/), or point $BUF at a buf binary")
    return path


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _output(out: subprocess.CompletedProcess) -> str:
    return f"buf exited {out.returncode}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.removeprefix("v").split("."))


def _last_release() -> Path:
    snapshots = [p for p in RELEASED.iterdir() if p.is_dir() and re.fullmatch(r"v\d+\.\d+\.\d+", p.name)]
    assert snapshots, f"no released API snapshot under {RELEASED}"
    return max(snapshots, key=lambda p: _version(p.name))


def _tree_copy(tmp_path: Path) -> Path:
    """The buf workspace (config, live proto, released snapshots) copied, to be broken on purpose."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(RELEASED, tmp_path / "api" / "released")
    return tmp_path


def _edit(path: Path, pattern: str, repl: str) -> None:
    text = path.read_text()
    new, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    assert n == 1, f"pattern {pattern!r} not found in {path}: update this test to the proto"
    path.write_text(new)


def _against(tree: Path) -> str:
    """The last released snapshot as buf's --against input, relative to tree (ROOT or a copy)."""
    return str(_last_release().relative_to(ROOT))


# -- the live API -------------------------------------------------------------------------------------

def test_lint_passes():
    out = _run(ROOT, "lint")
    assert out.returncode == 0, _output(out)


def test_no_breaking_change_against_last_release():
    out = _run(ROOT, "breaking", "--against", _against(ROOT))
    assert out.returncode == 0, "breaking change against the released API " + _output(out)


def test_last_release_snapshot_is_the_released_version():
    """A version bump in pyproject comes with its snapshot (api/released/README.md), else `buf
    breaking` would keep comparing with an older release."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        pytest.skip(f"pyproject version {version} is not a release")
    assert _last_release().name == f"v{version}", (
        f"pyproject says {version} but the newest snapshot is {_last_release().name}: copy proto/ "
        f"to api/released/v{version}/ (api/released/README.md)")
    assert (_last_release() / PROTO_REL.relative_to("proto")).is_file()


# -- the checks do refuse ------------------------------------------------------------------------------

BREAKING = {
    # A field's type changed: old clients' bytes would misdecode.
    "field-type": (r"^(\s*)string token = 8;", r"\1int64 token = 8;",
                   ['"PersonalizeRequest"', "changed type from \"string\" to \"int64\""]),
    # A field's number changed: the wire tag moves.
    "field-number": (r"^(\s*)bytes safetensors = 2;", r"\1bytes safetensors = 12;",
                     ['"ImportAdapterRequest"', "safetensors"]),
    # A field removed without reserving it.
    "field-deleted": (r"^\s*float alpha = 4;.*\n", "",
                      ['"ImportAdapterRequest"', '"alpha"', "deleted"]),
    # An enum value renamed: the wire is the same, but JSON and the generated Python are not (FILE
    # catches it, WIRE would not).
    "enum-value-renamed": (r"^(\s*)QUEUED = 1;", r"\1PENDING = 1;", ['"QUEUED"']),
}


@pytest.mark.parametrize("change", sorted(BREAKING))
def test_breaking_change_fails(tmp_path, change):
    pattern, repl, expected = BREAKING[change]
    tree = _tree_copy(tmp_path)
    _edit(tree / PROTO_REL, pattern, repl)
    out = _run(tree, "breaking", "--against", _against(tree))
    assert out.returncode != 0, "buf breaking accepted a breaking change " + _output(out)
    text = out.stdout + out.stderr
    assert "steerserve.proto" in text, _output(out)
    for word in expected:
        assert word in text, f"{word!r} not named " + _output(out)


def test_additive_change_passes(tmp_path):
    tree = _tree_copy(tmp_path)
    _edit(tree / PROTO_REL, r"^message ServerInfo \{\n", "message ServerInfo {\n  string added_later = 99;\n")
    out = _run(tree, "breaking", "--against", _against(tree))
    assert out.returncode == 0, _output(out)


def test_lint_violation_fails(tmp_path):
    tree = _tree_copy(tmp_path)
    with open(tree / PROTO_REL, "a") as f:
        f.write("\nmessage bad_message {\n  string someField = 1;\n}\n")
    out = _run(tree, "lint")
    assert out.returncode != 0, "buf lint accepted a violation " + _output(out)
    assert "bad_message" in out.stdout and "someField" in out.stdout, _output(out)


def test_lint_waivers_cover_only_the_released_file(tmp_path):
    """The v1 file's waivers (unprefixed enum values, ...) do not extend to a new file."""
    tree = _tree_copy(tmp_path)
    (tree / PROTO_REL.parent / "extra.proto").write_text(
        'syntax = "proto3";\n\npackage steerserve.v1;\n\n'
        "enum Color {\n  COLOR_UNSPECIFIED = 0;\n  RED = 1;\n}\n")
    out = _run(tree, "lint")
    assert out.returncode != 0, _output(out)
    assert "extra.proto" in out.stdout and "RED" in out.stdout, _output(out)
