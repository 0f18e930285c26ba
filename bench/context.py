"""What every row gets: the mode, a scratch folder, the guest, its peers.

``Context`` holds the run's settings (quick or full, accel), the scratch
folder (short, under /tmp, for QMP socket paths), the boot-sector guest
image, and hands out workers and raw-QEMU launchers that are always
cleaned up. Leaked processes found at cleanup are collected in ``leaks``
and reported; the run then fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
from typing import Iterator

from .rawqemu import RawQemu
from .workerproc import ROOT, WorkerProcess

#: Worker settings the bench needs beyond the defaults: admission allows
#: 4 vCPUs per host CPU, and the status row runs 100 one-vCPU VMs on a
#: 2-CPU machine.
WORKER_CONFIG = {"cpu_overcommit": 64.0}


@dataclasses.dataclass
class Context:
    quick: bool
    base: str
    accel: str
    image: str = ""
    leaks: list[str] = dataclasses.field(default_factory=list)
    worker_config: dict = dataclasses.field(
        default_factory=lambda: dict(WORKER_CONFIG))
    #: What one row measured for a later one (e.g. the status row's worker
    #: statistics with 0 and N VMs, reported by the supervisor row).
    shared: dict = dataclasses.field(default_factory=dict)

    def pick(self, quick: int | float, full: int | float):
        """The quick-mode or the full-mode value of a setting."""
        return quick if self.quick else full

    def build_guest(self) -> str:
        """Assemble the idle boot-sector guest (tests/guests.py) once."""
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import guests  # the tests' own guest builder: one source of guests
        self.image = str(guests.build_guest("idle", pathlib.Path(self.base)))
        return self.image

    @contextlib.contextmanager
    def worker(self, name: str) -> Iterator[WorkerProcess]:
        proc = WorkerProcess(self.base, name, self.accel, self.image,
                             self.worker_config)
        try:
            yield proc.start()
        except Exception as err:
            err.add_note(f"worker log ({proc.out}), last lines:\n"
                         f"{proc.tail(1200)}")
            raise
        finally:
            self.leaks += proc.close()

    def raw_qemu(self, name: str) -> RawQemu:
        return RawQemu(os.path.join(self.base, name), self.image, self.accel)
