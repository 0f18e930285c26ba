"""Every path the worker uses, derived in one place.

QEMU outlives the worker, so a restarted worker must find each VM's files
from the uuid alone: nothing here depends on anything but the var dir.
"""

from __future__ import annotations

import os


class VarLayout:
    """The var dir: journal, logs, per-VM folders, failed saves."""

    def __init__(self, var: str):
        self.var = var
        self.journal = os.path.join(var, "journal")
        self.log_dir = os.path.join(var, "log")
        self.log_file = os.path.join(self.log_dir, "worker.log")
        self.vms = os.path.join(var, "vms")
        self.failed_to_save = os.path.join(var, "failed_to_save")
        self.storage = os.path.join(var, "storage")
        self.images = os.path.join(var, "images")

    def create(self) -> None:
        for d in (self.journal, self.log_dir, self.vms, self.failed_to_save,
                  self.storage, self.images):
            os.makedirs(d, exist_ok=True)

    def vm(self, uuid: str) -> "VMPaths":
        return VMPaths(os.path.join(self.vms, uuid))


class VMPaths:
    """The folder of one VM: ``VAR/vms/<uuid>/``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.qmp = os.path.join(folder, "qmp.sock")
        self.qmp_events = os.path.join(folder, "qmp-events.sock")
        self.pidfile = os.path.join(folder, "qemu.pid")
        self.log = os.path.join(folder, "qemu.log")

    def overlay(self, slot: str) -> str:
        """The VM's copy-on-write disk over a cached base (hda or hdb)."""
        return os.path.join(self.folder, f"disk-{slot}.qcow2")

    def flat(self, slot: str, fmt: str) -> str:
        """A halted VM's disk as one self-contained image, ready to save."""
        return os.path.join(self.folder, f"save-{slot}.{fmt}")
