"""How full this host is, for the dashboard's capacity bars.

CPU and memory are shown the way admission (``resources``) counts them:
vCPUs given to VMs against host CPUs times the overcommit factor, and VM
memory (plus QEMU's overhead) against host memory minus the reserve. Disk
is each filesystem holding the var dir or a storage root: what the worker's
own files take (VM folders and the image cache), what the rest of the host
takes, and what is free. Walking the worker's folders is cached for a few
seconds, since the dashboard asks every two.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

from . import resources

DISK_WALK_TTL = 10.0


def _allocated(folder: str) -> int:
    """Bytes allocated on disk under ``folder`` (sparse images count less)."""
    total = 0
    stack = [folder]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    return total


class HostStats:
    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self._walked: tuple[float, dict[int, int]] = (0.0, {})
        psutil.cpu_percent(None)  # the first call only starts the measure

    def _worker_bytes(self) -> dict[int, int]:
        """Bytes of the worker's own files, per device."""
        with self._lock:
            at, sizes = self._walked
            if time.monotonic() - at < DISK_WALK_TTL:
                return sizes
        var = self.service.cfg.var
        sizes: dict[int, int] = {}
        for name in ("vms", "images", "failed_to_save"):
            folder = os.path.join(var, name)
            try:
                dev = os.stat(folder).st_dev
            except OSError:
                continue
            sizes[dev] = sizes.get(dev, 0) + _allocated(folder)
        with self._lock:
            self._walked = (time.monotonic(), sizes)
        return sizes

    def snapshot(self) -> dict:
        svc = self.service
        cfg = svc.cfg
        vms = svc.vms()
        used = resources.usage(vms, cfg.qemu_overhead_mb)
        cpu_limit = max(1, int(svc.host.cpus * cfg.cpu_overcommit))
        mem = psutil.virtual_memory()
        out = {
            "cpu": {
                "host_cpus": svc.host.cpus,
                "limit": cpu_limit,
                "vms": used.cpus,
                "overcommit": cfg.cpu_overcommit,
                "load_percent": psutil.cpu_percent(None),
            },
            "memory": {
                "total_mb": svc.host.memory_mb,
                "vms_mb": used.memory_mb,
                "reserve_mb": cfg.memory_reserve_mb,
                "free_for_vms_mb": max(0, svc.host.memory_mb
                                       - cfg.memory_reserve_mb
                                       - used.memory_mb),
                "host_used_mb": (mem.total - mem.available) >> 20,
            },
            "disks": [],
            "vm_count": len(vms),
        }
        worker = self._worker_bytes()
        seen: dict[int, dict] = {}
        for label, path in [("var", cfg.var)] + [("storage", r) for r in cfg.roots]:
            try:
                dev = os.stat(path).st_dev
                usage = psutil.disk_usage(path)
            except OSError:
                continue
            if dev in seen:
                seen[dev]["paths"].append(path)
                continue
            mine = min(worker.get(dev, 0), usage.used)
            seen[dev] = {"paths": [path], "label": label,
                         "total": usage.total, "worker": mine,
                         "other": max(0, usage.used - mine),
                         "free": usage.free}
            out["disks"].append(seen[dev])
        return out
