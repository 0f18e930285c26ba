"""The worker's one error tree; every error knows the HTTP status it maps to.

The API layer turns any of these into the JSON envelope in one place
(``vmworker.app``), so a handler only has to raise. Foreign errors (OSError,
requests, QMP) are translated at their boundary and chained ``from err``.

    VMWorkerError (500)
    ├── BadRequest (400)               a parameter is malformed or not allowed
    ├── Unauthorized (401)             the API token is missing or wrong
    ├── Forbidden (403)                a browser sent a cross-site request
    ├── UnknownVM (404)                no VM has that uuid or name
    ├── Conflict (409)
    │   ├── NameTaken                  a live VM already has that name
    │   ├── UuidConflict               same uuid, different parameters
    │   └── WrongState                 the VM's status does not allow this
    ├── Unavailable (503)
    │   ├── NotEnoughResources         admission refused the VM
    │   └── JournalError               the journal cannot be made durable
    ├── JournalCorrupt (500)           a record in the middle is damaged
    ├── ConfigError (500)              the worker's own configuration is wrong
    ├── PidFileError (500)             the pidfile cannot be created or locked
    │   └── AlreadyRunning             another live vmworker holds it
    ├── ImageError (500)               fetching or probing an image failed
    └── HypervisorError (500)          QEMU or QMP failed
        └── QMPCommandError            QEMU answered a command with an error
"""

from __future__ import annotations


class VMWorkerError(Exception):
    """Root of every error the worker raises on purpose."""

    http_status = 500


class BadRequest(VMWorkerError):
    http_status = 400


class Unauthorized(VMWorkerError):
    http_status = 401


class Forbidden(VMWorkerError):
    http_status = 403


class UnknownVM(VMWorkerError):
    http_status = 404


class Conflict(VMWorkerError):
    http_status = 409


class NameTaken(Conflict):
    pass


class UuidConflict(Conflict):
    pass


class WrongState(Conflict):
    """An action is not allowed in the VM's current status.

    The message names the VM, its current status and the statuses that
    would have allowed the action, so the caller knows what to wait for.
    """

    def __init__(self, vm_label: str, action: str, current: str, allowed):
        self.current = current
        self.allowed = tuple(allowed)
        wanted = ", ".join(repr(s) for s in self.allowed) or "none"
        super().__init__(
            f"cannot {action} VM {vm_label}: its status is {current!r}; "
            f"{action} needs one of {wanted}")


class Unavailable(VMWorkerError):
    http_status = 503


class NotEnoughResources(Unavailable):
    pass


class JournalError(Unavailable):
    pass


class JournalCorrupt(VMWorkerError):
    pass


class ConfigError(VMWorkerError):
    pass


class PidFileError(VMWorkerError):
    pass


class AlreadyRunning(PidFileError):
    pass


class ImageError(VMWorkerError):
    pass


class HypervisorError(VMWorkerError):
    pass


class QMPCommandError(HypervisorError):
    pass
