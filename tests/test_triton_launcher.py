"""The launcher refuses, at once and by name, a Triton whose shared libraries are missing.

Found on the first real image build: Debian's python3 lacks libpython3.11, which the python
backend's stub links; every model's stub then failed to start and the server waited, never ready,
until the launcher's 10-minute start timeout. Here a copy of the real stub asks for a library that
exists nowhere (its DT_NEEDED name changed in place, same length), so ldd reports it not found."""

import shutil
from pathlib import Path

import pytest

from service.triton import launcher
from service.triton.launcher import TritonDistribution, TritonServer, TritonStartError, missing_libraries

NEEDED = b"libpython3.11.so.1.0"
ABSENT = b"libpythonX.11.so.1.0"


def _distribution_with_a_broken_stub(tmp_path: Path) -> TritonDistribution:
    real = TritonDistribution.find()
    fake = TritonDistribution(tmp_path / "pytriton" / "tritonserver")
    fake.bundled_libraries.symlink_to(real.bundled_libraries)  # the wheel's own libraries, found as there
    for source, target in ((real.binary, fake.binary), (real.python_backend_library, fake.python_backend_library)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    fake.stub.parent.mkdir(parents=True, exist_ok=True)
    data = real.stub.read_bytes()
    assert data.count(NEEDED) >= 1, "the stub no longer names libpython3.11: adapt this test"
    fake.stub.write_bytes(data.replace(NEEDED, ABSENT))
    fake.stub.chmod(0o755)
    return fake


@pytest.fixture
def broken(tmp_path):
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    return _distribution_with_a_broken_stub(tmp_path)


def test_the_installed_server_finds_every_library():
    assert missing_libraries(TritonDistribution.find()) == []
    assert launcher.main(["--check"]) == 0


def test_a_missing_library_is_named(broken):
    assert missing_libraries(broken) == [f"triton_python_backend_stub: {ABSENT.decode()} => not found"]


def test_start_refuses_at_once_naming_the_library(broken, tmp_path, monkeypatch):
    monkeypatch.setattr(TritonDistribution, "find", classmethod(lambda cls: broken))
    server = TritonServer(str(Path(launcher.__file__).resolve().parents[2] / "model_repo"), work_dir=str(tmp_path / "w"),
                          start_timeout_s=600)
    with pytest.raises(TritonStartError, match=f"shared libraries not found: triton_python_backend_stub: {ABSENT.decode()}"):
        server.start()
    assert server.process is None  # nothing was started
    assert launcher.main(["--check"]) == 1


def test_follow_copies_the_server_log_to_stdout_from_before_it_exists_to_after_stop(tmp_path):
    """`python -m service.triton.launcher` echoes tritonserver's log file on its stdout (what
    `kubectl logs` of a Triton pod shows): from a file that does not exist yet, every line appended
    while it runs, and whatever was written just before the stop."""
    import io
    import threading

    from service.triton.launcher import follow

    path, out, stop = tmp_path / "tritonserver.log", io.BytesIO(), threading.Event()
    echo = threading.Thread(target=follow, args=(path, out, stop, 0.01))
    echo.start()
    with open(path, "ab") as f:
        for i in range(200):
            f.write(f"I1207 model line {i}\n".encode())
            f.flush()
    stop.set()
    echo.join(10)
    assert not echo.is_alive()
    assert out.getvalue().decode().splitlines() == [f"I1207 model line {i}" for i in range(200)]
