"""Boot each test guest from tests/guests.py in real QEMU (no vmworker code).

These tests pin down the behaviour the vmworker tests rely on: which guests
make QEMU exit by themselves, which stay up, and that the disk write lands.

QEMU runs with KVM when /dev/kvm can be opened read-write, else with TCG;
set VMWORKER_TEST_ACCEL=kvm or =tcg to force one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

try:
    import guests
except ImportError:  # tests/ imported as a package
    from tests import guests

QEMU = "qemu-system-x86_64"
EXIT_TIMEOUT = 20.0


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def _accel() -> str:
    accel = os.environ.get("VMWORKER_TEST_ACCEL", "").strip()
    if not accel:
        return "kvm" if _kvm_usable() else "tcg"
    if accel not in ("kvm", "tcg"):
        raise pytest.UsageError(f"VMWORKER_TEST_ACCEL must be 'kvm' or 'tcg', not {accel!r}")
    return accel


ACCEL = _accel()

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")


@contextlib.contextmanager
def run_qemu(image: pathlib.Path, log: pathlib.Path, *extra: str):
    """Start QEMU on `image`; on leaving, kill it if still running and reap it."""
    cmd = [
        QEMU,
        "-machine", f"pc,accel={ACCEL}",
        "-nodefaults",
        "-display", "none",
        "-m", "32",
        "-drive", f"file={image},format=raw,if=ide,index=0,media=disk",
        *extra,
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    proc.started = time.monotonic()
    proc.log = log
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _wait_exit(proc: subprocess.Popen, timeout: float = EXIT_TIMEOUT) -> float:
    """Wait for QEMU to exit by itself; return seconds since it was started."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU ({ACCEL}) still running after {timeout} s; log:\n{proc.log.read_text()}")
    elapsed = time.monotonic() - proc.started
    assert proc.returncode == 0, f"QEMU exited with {proc.returncode}; log:\n{proc.log.read_text()}"
    print(f"{ACCEL}: QEMU exited after {elapsed:.2f} s")
    return elapsed


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --------------------------------------------------------------------------
# Image building (no QEMU needed).


def test_image_layout(tmp_path):
    image = guests.build_guest("poweroff", tmp_path, disk_size=64 * 1024)
    data = image.read_bytes()
    assert len(data) == 64 * 1024
    assert data[510:512] == b"\x55\xaa"
    assert data[512:] == bytes(len(data) - 512)
    assert guests.read_marker(image) == b""


def test_each_call_gives_a_fresh_image_and_reuses_the_assembly(tmp_path, monkeypatch):
    first = guests.build_guest("write-then-poweroff", tmp_path, marker=b"abc")
    # With no binutils on PATH, only the cache can provide the boot sector.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    second = guests.build_guest("write-then-poweroff", tmp_path, marker=b"abc")
    assert first != second
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(guests.GuestBuildError, match="install binutils"):
        guests.build_guest("write-then-poweroff", tmp_path, marker=b"abcd")


def test_marker_is_part_of_the_boot_sector(tmp_path):
    a = guests.build_guest("write-then-poweroff", tmp_path, marker=b"marker-a").read_bytes()[:512]
    b = guests.build_guest("write-then-poweroff", tmp_path, marker=b"marker-b").read_bytes()[:512]
    assert b"marker-a" in a and b"marker-b" in b


@pytest.mark.parametrize(
    "kind, marker, disk_size",
    [
        ("nonsense", b"", 1 << 20),
        ("write-then-poweroff", b"", 1 << 20),
        ("write-then-poweroff", b"x" * 65, 1 << 20),
        ("write-then-poweroff", b"ends-in-nul\0", 1 << 20),
        ("idle", b"only-for-writers", 1 << 20),
        ("idle", b"", 512),
        ("idle", b"", 1000),
    ],
)
def test_bad_arguments(tmp_path, kind, marker, disk_size):
    with pytest.raises(ValueError):
        guests.build_guest(kind, tmp_path, marker=marker, disk_size=disk_size)


# --------------------------------------------------------------------------
# Booting the guests.


@needs_qemu
@pytest.mark.timeout(60)
def test_poweroff_exits_qemu(tmp_path):
    image = guests.build_guest("poweroff", tmp_path)
    with run_qemu(image, tmp_path / "qemu.log") as proc:
        _wait_exit(proc)


@needs_qemu
@pytest.mark.timeout(60)
def test_write_then_poweroff_writes_marker_and_exits(tmp_path):
    marker = b"vmworker-test-marker \x00\x01\xfe\xff "  # binary, inner NUL
    marker += b"M" * (guests.MAX_MARKER - len(marker))  # longest allowed
    image = guests.build_guest("write-then-poweroff", tmp_path, marker=marker)
    assert guests.read_marker(image) == b""
    with run_qemu(image, tmp_path / "qemu.log") as proc:
        _wait_exit(proc)
    assert guests.read_marker(image) == marker
    assert image.stat().st_size == 1 << 20


@needs_qemu
@pytest.mark.timeout(60)
def test_idle_stays_up_without_using_cpu(tmp_path):
    image = guests.build_guest("idle", tmp_path)
    with run_qemu(image, tmp_path / "qemu.log") as proc:
        time.sleep(2)
        assert proc.poll() is None, f"idle guest exited; log:\n{proc.log.read_text()}"
        # Once booted the guest only halts: look for a 1 s window in which
        # QEMU uses (almost) no CPU.  A spinning guest would use ~1 s per s.
        deadline = time.monotonic() + 15
        while True:
            before = _cpu_seconds(proc.pid)
            time.sleep(1)
            used = _cpu_seconds(proc.pid) - before
            if used < 0.3:
                break
            assert time.monotonic() < deadline, f"idle guest keeps using CPU ({used:.2f} s/s)"
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL


@needs_qemu
@pytest.mark.timeout(60)
def test_wait_then_poweroff_runs_for_a_while_then_exits(tmp_path):
    image = guests.build_guest("wait-then-poweroff", tmp_path)
    with run_qemu(image, tmp_path / "qemu.log") as proc:
        time.sleep(0.5)
        assert proc.poll() is None, f"guest exited too early; log:\n{proc.log.read_text()}"
        elapsed = _wait_exit(proc)
    # The guest itself waits 2 s (RTC based, so never less) after booting.
    assert elapsed >= 2.0
