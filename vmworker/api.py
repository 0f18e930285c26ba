"""The /vmachines handlers: parse, validate, call the service, answer.

Every endpoint answers GET and POST and returns a JSON object with
``success`` and ``message``. Handlers only raise the worker's errors; the
error handler in ``app`` turns them into the envelope with their status.
"""

from __future__ import annotations

import json

import cherrypy

from . import validation
from .errors import BadRequest, ImageError
from .service import VMService
from .state import VMRecord


def answer(payload: dict, message: str) -> bytes:
    cherrypy.response.headers["Content-Type"] = "application/json"
    cherrypy.response.headers["Cache-Control"] = "no-store"
    body = {"success": True, "message": message}
    body.update(payload)
    return json.dumps(body).encode()


def describe(vm: VMRecord, service: VMService) -> dict:
    """The status object of one VM, as status and list return it."""
    out = {
        "uuid": vm.uuid,
        "name": vm.name,
        "status": vm.status.value,
        "message": vm.message,
        "vnc": vm.vnc,
        "cpu_count": vm.params["cpu_count"],
        "mem_size": vm.params["mem_size"],
        "hda_image": vm.params["hda_image"],
        "hdb_image": vm.params.get("hdb_image", ""),
        "cd_image": vm.cd_image,
        "hda_save_to": vm.save_to.get("hda", ""),
        "hdb_save_to": vm.save_to.get("hdb", ""),
        "run_agent": vm.params.get("run_agent", False),
        "soft_list": vm.params.get("soft_list", ""),
        "created": vm.created,
        "updated": vm.updated,
        "pid": vm.pid,
        "halt_reason": vm.halt_reason,
        "save_tries": dict(vm.save_tries),
        "saved": dict(vm.saved),
        "progress": None,
    }
    if vm.vnc_password and vm.vnc:
        out["vnc_password"] = vm.vnc_password
    progress = service.progress(vm.uuid)
    if progress is not None:
        what, done, total = progress
        out["progress"] = {"step": what, "done": done, "total": total}
    return out


class VMachines:
    """Mounted at /vmachines."""

    # Other methods get 405 with an Allow header (CherryPy's allow tool).
    _cp_config = {"tools.allow.on": True,
                  "tools.allow.methods": ["GET", "HEAD", "POST"]}

    def __init__(self, service: VMService, jobs):
        self.service = service
        self.jobs = jobs

    def _select(self, params: dict, extra=()) -> str:
        uuid, name = validation.selector(params, extra)
        return self.service.get(uuid=uuid, name=name).uuid

    @cherrypy.expose
    def start(self, **params):
        vm, created = self.service.start(params)
        message = ("accepted; the VM is starting" if created
                   else f"VM already known (status {vm.status.value}); "
                        "nothing started again")
        return answer({"uuid": vm.uuid, "status": vm.status.value}, message)

    @cherrypy.expose
    def status(self, **params):
        vm = self.service.get(uuid=self._select(params))
        return answer(describe(vm, self.service), vm.message)

    @cherrypy.expose
    def list(self, **params):
        validation.reject_unknown(params, ())
        vms = [describe(vm, self.service) for vm in self.service.vms()]
        return answer({"vmachines": vms}, f"{len(vms)} VMs")

    @cherrypy.expose
    def modify(self, **params):
        uuid = self._select(params, validation.MODIFY_FIELDS)
        changes = validation.modify_params(params, self.service.cfg.roots)

        def fetch_cd(vm_uuid: str, uri: str, sha256: str):
            try:
                return self.jobs.fetch_cd(vm_uuid, uri, sha256)
            except ImageError as err:
                raise BadRequest(f"cd_image: {err}") from err

        vm = self.service.modify(uuid, changes, fetch_cd)
        return answer({"uuid": vm.uuid, "status": vm.status.value},
                      f"modified {', '.join(sorted(changes))}")

    @cherrypy.expose
    def destroy(self, **params):
        vm = self.service.destroy(self._select(params))
        return answer({"uuid": vm.uuid, "status": vm.status.value},
                      "destroyed")

    @cherrypy.expose
    def suspend(self, **params):
        vm = self.service.suspend(self._select(params))
        return answer({"uuid": vm.uuid, "status": vm.status.value},
                      "suspended")

    @cherrypy.expose
    def resume(self, **params):
        vm = self.service.resume(self._select(params))
        return answer({"uuid": vm.uuid, "status": vm.status.value}, "resumed")
