"""The OpenAPI 3 description of the /vmachines API, served at /openapi.json.

Written from the same parameter lists that validation enforces, so the
description cannot drift from what the worker accepts; a test runs
schemathesis against the live worker with it.
"""

from __future__ import annotations

from . import validation

STATUSES = ["starting", "failed to start", "installing", "running",
            "suspended", "saving", "failed to save", "stopped", "destroyed"]

_TEXT = {"type": "string"}
_PARAM_SCHEMAS = {
    "name": {"type": "string",
             "pattern": "^" + validation.NAME_RE.pattern.removesuffix("\\Z") + "$",
             "description": "1 to 64 of A-Z a-z 0-9 _ . -, first a letter or digit"},
    "uuid": {"type": "string", "format": "uuid"},
    "cpu_count": {"type": "integer", "minimum": 1, "maximum": validation.MAX_CPUS},
    "mem_size": {"type": "integer", "minimum": validation.MIN_MEM_MB,
                 "maximum": validation.MAX_MEM_MB, "description": "MB"},
    "run_agent": {"type": "string", "enum": ["true", "false"]},
}
_IMAGE = ("absolute path or file:// URI inside the storage roots, http://, "
          "https:// or ftp://")
_TARGET = ("where the disk is uploaded when the guest halts (same kinds of "
           "URI; HTTP uses PUT, FTP uses STOR); empty: discarded")
_DESCRIPTIONS = {
    "hda_image": _IMAGE, "hdb_image": _IMAGE,
    "cd_image": _IMAGE + "; on modify, an empty value ejects the CD",
    "hda_save_to": _TARGET, "hdb_save_to": _TARGET,
    "soft_list": "software for the guest agent to install",
    "hda_image_sha256": "sha256 the image must have (64 hex digits)",
    "hdb_image_sha256": "sha256 the image must have (64 hex digits)",
    "cd_image_sha256": "sha256 the image must have (64 hex digits)",
}

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERRORS = {
    "400": "a parameter is missing, malformed or not allowed",
    "401": "the API token is missing or wrong",
    "403": "a browser's cross-site request",
    "404": "no VM has that uuid or name",
    "409": "the VM's status does not allow this, or the name is taken",
    "503": "not enough resources, or the journal cannot be written",
}

VM_STATUS = {
    "type": "object",
    "required": ["uuid", "name", "status", "message", "vnc", "cpu_count",
                 "mem_size"],
    "properties": {
        "uuid": {"type": "string", "format": "uuid"},
        "name": _TEXT,
        "status": {"type": "string", "enum": STATUSES},
        "message": _TEXT,
        "vnc": {"type": "string", "description": "host:port, or empty"},
        "vnc_password": {"type": "string",
                         "description": "with vnc_password configured"},
        "cpu_count": {"type": "integer"},
        "mem_size": {"type": "integer"},
        "hda_image": _TEXT, "hdb_image": _TEXT, "cd_image": _TEXT,
        "hda_save_to": _TEXT, "hdb_save_to": _TEXT,
        "run_agent": {"type": "boolean"}, "soft_list": _TEXT,
        "created": {"type": "number"}, "updated": {"type": "number"},
        "pid": {"type": ["integer", "null"]},
        "halt_reason": _TEXT,
        "save_tries": {"type": "object",
                       "additionalProperties": {"type": "integer"}},
        "saved": {"type": "object", "additionalProperties": _TEXT},
        "progress": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["step", "done"],
            "properties": {"step": _TEXT, "done": {"type": "integer"},
                           "total": {"type": ["integer", "null"]}}}]},
    },
}

_CHANGED = {"type": "object", "required": ["success", "message", "uuid", "status"],
            "properties": {"success": {"const": True}, "message": _TEXT,
                           "uuid": {"type": "string", "format": "uuid"},
                           "status": {"type": "string", "enum": STATUSES}}}

ENDPOINTS = {
    "start": ("Accept a VM and start it in the background",
              validation.START_REQUIRED, validation.START_OPTIONAL, _CHANGED),
    "status": ("One VM's status", (), validation.SELECTORS,
               {"allOf": [{"$ref": "#/components/schemas/Envelope"},
                          {"$ref": "#/components/schemas/VMStatus"}]}),
    "list": ("Every VM's status", (), (),
             {"allOf": [{"$ref": "#/components/schemas/Envelope"},
                        {"type": "object", "required": ["vmachines"],
                         "properties": {"vmachines": {
                             "type": "array",
                             "items": {"$ref": "#/components/schemas/VMStatus"}}}}]}),
    "modify": ("Change save targets or the CD", (),
               validation.SELECTORS + validation.MODIFY_FIELDS, _CHANGED),
    "destroy": ("Kill the VM; nothing is saved", (), validation.SELECTORS, _CHANGED),
    "suspend": ("Pause the VM", (), validation.SELECTORS, _CHANGED),
    "resume": ("Continue a paused VM", (), validation.SELECTORS, _CHANGED),
}


def _schema_of(name: str) -> dict:
    if name in _PARAM_SCHEMAS:
        return dict(_PARAM_SCHEMAS[name])
    schema = {"type": "string"}
    if name in _DESCRIPTIONS:
        schema["description"] = _DESCRIPTIONS[name]
    return schema


def _operation(name, summary, required, optional, ok, post: bool) -> dict:
    params = list(required) + list(optional)
    responses = {"200": {"description": "done", "content": {
        "application/json": {"schema": ok}}}}
    for code, text in _ERRORS.items():
        responses[code] = {"description": text, "content": {
            "application/json": {"schema": _ERROR}}}
    op = {"operationId": f"{name}_{'post' if post else 'get'}",
          "summary": summary, "responses": responses}
    if post:
        op["requestBody"] = {"required": bool(required), "content": {
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object",
                "properties": {p: _schema_of(p) for p in params},
                "required": list(required),
                "additionalProperties": False}}}}
    else:
        op["parameters"] = [{"name": p, "in": "query", "required": p in required,
                             "schema": _schema_of(p)} for p in params]
    return op


def spec(server_url: str = "/") -> dict:
    paths = {}
    for name, (summary, required, optional, ok) in ENDPOINTS.items():
        paths[f"/vmachines/{name}"] = {
            "get": _operation(name, summary, required, optional, ok, False),
            "post": _operation(name, summary, required, optional, ok, True),
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "vmworker", "version": "1",
                 "description": "Start, watch and stop QEMU/KVM VMs on this "
                                "host. Every answer is a JSON object with "
                                "success and message."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"schemas": {
            "Envelope": {"type": "object", "required": ["success", "message"],
                         "properties": {"success": {"type": "boolean"},
                                        "message": _TEXT}},
            "Error": {"type": "object", "required": ["success", "message"],
                      "properties": {"success": {"const": False},
                                     "message": _TEXT}},
            "VMStatus": VM_STATUS,
        }},
    }
