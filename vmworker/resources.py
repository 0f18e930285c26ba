"""Admission: does one more VM fit on this host?

Memory is not overcommitted: the guests' memory plus QEMU's own overhead,
for every VM that has or will have a process, must fit in the host's memory
minus a reserve for the host. vCPUs may be overcommitted by a factor.
Refusals are 503 with what was asked and what is free.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import psutil

from .errors import NotEnoughResources
from .state import LIVE_PROCESS, Status, VMRecord

#: Statuses whose VMs hold host memory and CPUs (saving still holds disk).
HOLDING = LIVE_PROCESS | {Status.SAVING}


@dataclasses.dataclass(frozen=True)
class Host:
    cpus: int
    memory_mb: int

    @classmethod
    def measure(cls) -> "Host":
        return cls(cpus=os.cpu_count() or 1,
                   memory_mb=psutil.virtual_memory().total >> 20)


@dataclasses.dataclass(frozen=True)
class Usage:
    cpus: int
    memory_mb: int


def usage(vms: Iterable[VMRecord], overhead_mb: int) -> Usage:
    live = [vm for vm in vms if vm.status in HOLDING]
    return Usage(cpus=sum(int(vm.params["cpu_count"]) for vm in live),
                 memory_mb=sum(int(vm.params["mem_size"]) + overhead_mb
                               for vm in live))


def admit(params: dict, vms: Iterable[VMRecord], host: Host, *,
          reserve_mb: int, overhead_mb: int, cpu_overcommit: float,
          disk_free_mb: int | None = None, disk_need_mb: int = 0,
          disk_reserve_mb: int = 0) -> None:
    """Raise NotEnoughResources unless a VM with ``params`` fits.

    Disk: what is free under the var dir, less a reserve, must hold the
    VM's images that are known now (local ones); overlays start empty.
    """
    if disk_free_mb is not None and disk_need_mb > disk_free_mb - disk_reserve_mb:
        raise NotEnoughResources(
            f"not enough resource: asked {disk_need_mb} MB of disk for the "
            f"images, free {max(disk_free_mb - disk_reserve_mb, 0)} MB "
            f"({disk_free_mb} MB free, reserve {disk_reserve_mb} MB)")
    used = usage(vms, overhead_mb)
    want_mem = int(params["mem_size"]) + overhead_mb
    free_mem = host.memory_mb - reserve_mb - used.memory_mb
    if want_mem > free_mem:
        raise NotEnoughResources(
            f"not enough resource: asked {params['mem_size']} MB of memory "
            f"(+{overhead_mb} MB for QEMU), free {max(free_mem, 0)} MB "
            f"(host {host.memory_mb} MB, reserve {reserve_mb} MB, VMs "
            f"{used.memory_mb} MB)")
    cpu_limit = int(host.cpus * cpu_overcommit)
    want_cpu = int(params["cpu_count"])
    if used.cpus + want_cpu > cpu_limit:
        raise NotEnoughResources(
            f"not enough resource: asked {want_cpu} vCPUs, free "
            f"{max(cpu_limit - used.cpus, 0)} (host {host.cpus} CPUs x "
            f"{cpu_overcommit:g} overcommit, VMs {used.cpus})")
