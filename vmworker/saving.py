"""Saving a halted VM's disks to the targets the master chose.

Each disk with a save target gets up to three tries, each journaled with
its error, with a pause between tries. A file target is written by
``qemu-img convert`` straight from the VM's overlay and the cached base, in
the source's format, with O_DIRECT where the folder allows it, under a
temporary name, fsync'd, renamed in and its folder fsync'd, so a half
written file never passes for a saved image, nor does one a power cut
could still take back.
HTTP(S) targets get a streamed PUT (2xx required) and FTP targets a STOR of
the flattened image. If every try fails the disk is moved to
``VAR/failed_to_save/<name>-<uuid>/`` with a JSON sidecar: an image is
never lost.
"""
from __future__ import annotations

import ftplib
import logging
import os
import shutil
import time
from urllib.parse import unquote, urlsplit

import requests

from . import fsutil, images, validation
from .errors import ImageError, VMWorkerError

log = logging.getLogger(__name__)

TRIES = 3
CHUNK = 1 << 20


class SaveError(VMWorkerError):
    pass


class SaveJob:
    def __init__(self, service, uuid: str, backoff: float = 1.0):
        self.service = service
        self.uuid = uuid
        self.backoff = backoff

    def run(self) -> None:
        svc = self.service
        vm = svc.get(self.uuid)
        errors: dict[str, list[str]] = {}
        for slot in vm.pending_saves:
            errors[slot] = []
            first_try = int(vm.save_tries.get(slot, 0)) + 1
            for attempt in range(first_try, TRIES + 1):
                if svc.cancelled(self.uuid):
                    return
                target = svc.get(self.uuid).save_to[slot]  # the latest
                svc.commit(self.uuid, "save_attempt", slot=slot, target=target,
                           **{"try": attempt})
                try:
                    svc.report_progress(self.uuid, f"saving {slot} (try "
                                        f"{attempt})", 0, None)
                    self._save(vm, slot, target)
                except SaveError as err:
                    errors[slot].append(str(err))
                    svc.commit(self.uuid, "save_attempt", slot=slot,
                               target=target, error=str(err),
                               **{"try": attempt})
                    log.warning("VM %s: saving %s, try %d of %d failed: %s",
                                vm.label, slot, attempt, TRIES, err)
                    if attempt < TRIES:
                        time.sleep(self.backoff * attempt)
                    continue
                svc.commit(self.uuid, "saved", slot=slot, target=target)
                log.info("VM %s: %s saved to %s", vm.label, slot, target)
                break
        vm = svc.get(self.uuid)
        if vm.pending_saves:
            self._keep_failed(vm, errors)

    def _save(self, vm, slot: str, target: str) -> None:
        """One try: put the disk at ``target``.

        A file target is written straight from overlay + base by
        ``qemu-img convert`` (temp name, fsync, rename, fsync the folder):
        one write of the data instead of flattening and then copying. It
        is not read back: that would read the page cache, not the disk,
        and cost more than the write (issue 7's save row). Other targets
        get the flattened image, made once.
        """
        cfg = self.service.cfg
        image = vm.images.get(slot)
        if not image:
            raise SaveError(f"VM has no {slot} disk to save")
        local = validation.local_path(target, "save_to")
        if local is not None:
            _flatten_to_file(cfg.qemu_img_binary, image, local, cfg.roots)
        else:
            upload(self._flat(vm, slot), target,
                   timeout=(cfg.fetch_connect_timeout, cfg.fetch_read_timeout))

    def _flat(self, vm, slot: str) -> str:
        """The disk as one self-contained image in its source's format.

        Made once (it survives a worker restart) from the VM's overlay and
        the cached base: raw stays raw, qcow2 stays qcow2.
        """
        image = vm.images.get(slot)
        if not image:
            raise SaveError(f"VM has no {slot} disk to save")
        flat = self.service.layout.vm(vm.uuid).flat(slot, _source_format(image))
        if not os.path.exists(flat):
            try:
                images.flatten(self.service.cfg.qemu_img_binary,
                               str(image["path"]), _source_format(image), flat)
            except ImageError as err:
                raise SaveError(f"cannot flatten the {slot} disk: {err}") from err
        return flat

    def _keep_failed(self, vm, errors: dict[str, list[str]]) -> None:
        """Move the unsaved disks to failed_to_save, with a sidecar."""
        svc = self.service
        folder = os.path.join(svc.layout.failed_to_save, f"{vm.name}-{vm.uuid}")
        os.makedirs(folder, exist_ok=True)
        kept = {}
        for slot in vm.pending_saves:
            try:
                src = self._flat(vm, slot)
            except SaveError as err:
                kept[slot] = self._keep_unflattened(vm, slot, folder, str(err))
                kept[slot]["errors"] = errors.get(slot, [])
                continue
            fmt = os.path.splitext(src)[1].lstrip(".")
            dest = os.path.join(folder, f"{slot}.{fmt}")
            if os.path.exists(src):
                os.replace(src, dest)
            kept[slot] = {"path": dest, "target": vm.save_to[slot],
                          "format": fmt, "size": _size(dest),
                          "sha256": images.sha256_of(dest),
                          "errors": errors.get(slot, [])}
        fsutil.write_json(os.path.join(folder, "failed_to_save.json"),
                          {"uuid": vm.uuid, "name": vm.name, "images": kept})
        where = "; ".join(f"{slot} kept in {info['path']}"
                          for slot, info in kept.items())
        svc.commit(vm.uuid, "save_failed",
                   reason=f"saving failed {TRIES} times; {where}")
        log.error("VM %s: failed to save; %s", vm.label, where)


    def _keep_unflattened(self, vm, slot: str, folder: str, why: str) -> dict:
        """Flattening failed: keep the overlay and a copy of its base.

        The base lives in the image cache, which may evict it once the VM
        has ended; the copy makes the pair self-sufficient.
        """
        image = vm.images[slot]
        overlay = os.path.join(folder, f"{slot}.overlay.qcow2")
        base = os.path.join(folder, f"{slot}.base.{image['base_format']}")
        if os.path.exists(str(image["path"])):
            os.replace(str(image["path"]), overlay)
        if not os.path.exists(base):
            try:
                os.link(str(image["base"]), base)
            except OSError:
                shutil.copyfile(str(image["base"]), base)
        log.error("VM %s: %s; kept the overlay %s and its base %s", vm.label,
                  why, overlay, base)
        return {"path": overlay, "base": base, "target": vm.save_to[slot],
                "format": "qcow2", "base_format": image["base_format"],
                "note": f"{why}; rebase the overlay onto the base with "
                        "'qemu-img rebase -u -b BASE -F FORMAT OVERLAY'"}


def upload(path: str, target: str, *, timeout) -> None:
    """Send one image to a remote target; raise SaveError with the cause."""
    if not os.path.isfile(path):
        raise SaveError(f"the image {path} is missing")
    try:
        scheme = urlsplit(target).scheme.lower()
        if scheme in ("http", "https"):
            _save_http(path, target, timeout)
        elif scheme == "ftp":
            _save_ftp(path, target, sum(timeout))
        else:
            raise SaveError(f"unsupported target {target}")
    except requests.RequestException as err:
        raise SaveError(f"PUT {target} failed: {err}") from err
    except (ftplib.Error, EOFError) as err:
        raise SaveError(f"FTP STOR {target} failed: {err}") from err
    except OSError as err:
        raise SaveError(f"sending to {target} failed: {err.strerror or err}") from err


def _flatten_to_file(qemu_img: str, image, dest: str, roots) -> None:
    """Flatten a VM's overlay straight into a file target, durably."""
    folder = os.path.dirname(dest)
    # Checked at use: the folder (or a symlink in it) may have changed.
    if not validation.inside(folder, roots):
        raise SaveError(f"{dest} is outside the storage roots")
    if not os.path.exists(str(image["path"])):
        raise SaveError(f"the disk {image['path']} is missing")
    try:
        images.flatten(qemu_img, str(image["path"]), _source_format(image),
                       dest, direct=fsutil.supports_direct_io(folder))
        fsutil.fsync_dir(folder)
    except ImageError as err:
        raise SaveError(f"writing {dest} failed: {err}") from err
    except OSError as err:
        raise SaveError(f"writing {dest} failed: {err.strerror or err}") from err


def _save_http(path: str, target: str, timeout) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        resp = requests.put(target, data=f, timeout=timeout,
                            headers={"Content-Length": str(size),
                                     "Content-Type": "application/octet-stream"})
    if not 200 <= resp.status_code < 300:
        raise SaveError(f"PUT {target} answered HTTP {resp.status_code} "
                        f"{resp.reason}")


def _save_ftp(path: str, target: str, timeout: float) -> None:
    parts = urlsplit(target)
    with ftplib.FTP(timeout=timeout) as ftp:
        ftp.connect(parts.hostname, parts.port or 21)
        ftp.login(unquote(parts.username or "anonymous"),
                  unquote(parts.password or "anonymous@"))
        with open(path, "rb") as f:
            ftp.storbinary(f"STOR {unquote(parts.path)}", f, CHUNK)


def _source_format(image) -> str:
    """The format the VM's image came in (its disk is a qcow2 overlay)."""
    return str(image.get("base_format") or image["format"])


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
