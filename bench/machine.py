"""The machine and the code a run measured: printed above every table."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess

import psutil


def describe(root: str, scratch: str, accel: str) -> dict[str, str]:
    return {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical",
        "memory": f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
        "accelerator": ("KVM" if accel == "kvm" else "TCG (no usable /dev/kvm)"),
        "QEMU": _first_line(["qemu-system-x86_64", "--version"]),
        "Python": platform.python_version(),
        "scratch filesystem": _filesystem(scratch),
        "load average at start": load(),
        "date": datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(root),
    }


def load() -> str:
    """1-, 5- and 15-minute load averages: others may share the machine."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def commit(root: str) -> str:
    """Short HEAD, marked when the tree has changes; "uncommitted" if none."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "uncommitted"
    text = head.stdout.strip()
    if dirty.returncode == 0 and dirty.stdout.strip():
        text += " + uncommitted changes"
    return text


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _first_line(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip().splitlines() or ["unknown"])[0]


def _filesystem(path: str) -> str:
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            if best is None or len(mount) > len(best.mountpoint):
                best = part
    if best is None:
        return "unknown"
    return f"{best.fstype} on {best.device} (mounted at {best.mountpoint})"
