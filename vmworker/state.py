"""VM records and statuses as a pure fold over journal events.

Nothing here does I/O. The journal holds events; ``apply`` turns the record
a VM had into the record it has after one more event, and refuses events
that its current status does not allow (``check`` is the one guard for
that, used both before a request is journaled and during replay).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping

from .errors import WrongState

IMAGE_SLOTS = ("hda", "hdb", "cd")
SAVED_SLOTS = ("hda", "hdb")


class Status(str, enum.Enum):
    STARTING = "starting"
    FAILED_TO_START = "failed to start"
    INSTALLING = "installing"
    RUNNING = "running"
    SUSPENDED = "suspended"
    SAVING = "saving"
    FAILED_TO_SAVE = "failed to save"
    STOPPED = "stopped"
    DESTROYED = "destroyed"

    def __str__(self) -> str:
        return self.value


S = Status
#: Statuses after which no QEMU process may live and nothing more happens.
FINAL = frozenset({S.FAILED_TO_START, S.FAILED_TO_SAVE, S.STOPPED, S.DESTROYED})
#: Statuses in which a QEMU process is (or is about to be) alive.
LIVE_PROCESS = frozenset({S.STARTING, S.INSTALLING, S.RUNNING, S.SUSPENDED})
#: Statuses in which a person may use the VM's console.
CONSOLE = frozenset({S.RUNNING, S.SUSPENDED})

# event type -> statuses it may be applied in. The target status is computed
# by ``_transition`` because some depend on the record (halted -> saving or
# stopped).
ALLOWED: Mapping[str, frozenset] = {
    "accepted": frozenset(),  # only for a VM that does not exist yet
    "snapshot": frozenset(),  # compaction: a whole record, as the first event
    "image_fetched": frozenset({S.STARTING}),
    "spawned": frozenset({S.STARTING}),
    "install_started": frozenset({S.STARTING}),
    "running": frozenset({S.STARTING, S.INSTALLING}),
    "start_failed": frozenset({S.STARTING, S.INSTALLING}),
    "suspended": frozenset({S.RUNNING}),
    "resumed": frozenset({S.SUSPENDED}),
    "modified": frozenset({S.STARTING, S.INSTALLING, S.RUNNING, S.SUSPENDED}),
    "cd_changed": frozenset({S.RUNNING, S.SUSPENDED}),
    "halted": frozenset({S.INSTALLING, S.RUNNING, S.SUSPENDED}),
    "save_attempt": frozenset({S.SAVING}),
    "saved": frozenset({S.SAVING}),
    "save_failed": frozenset({S.SAVING}),
    "destroyed": frozenset({S.STARTING, S.FAILED_TO_START, S.INSTALLING,
                            S.RUNNING, S.SUSPENDED, S.SAVING, S.FAILED_TO_SAVE}),
}

# The words a request uses for the events it causes, for error messages.
ACTION_EVENT = {
    "suspend": "suspended",
    "resume": "resumed",
    "modify": "modified",
    "change the CD of": "cd_changed",
    "destroy": "destroyed",
}


@dataclasses.dataclass(frozen=True)
class VMRecord:
    """What the worker knows about one VM: its request and what followed."""

    uuid: str
    name: str
    params: Mapping[str, object]
    status: Status
    message: str
    created: float
    updated: float
    # The QEMU process, kept after the VM ends so that a leftover process
    # can still be recognised and killed.
    pid: int | None = None
    create_time: float | None = None
    vnc: str = ""
    vnc_password: str = ""
    images: Mapping[str, Mapping[str, object]] = dataclasses.field(
        default_factory=dict)
    save_to: Mapping[str, str] = dataclasses.field(default_factory=dict)
    halt_reason: str = ""
    save_tries: Mapping[str, int] = dataclasses.field(default_factory=dict)
    saved: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Whether modify ever changed the CD (an eject leaves no image).
    cd_changed: bool = False

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.uuid})"

    @property
    def cd_image(self) -> str:
        """The CD's URI now: the one asked at start, or the last change."""
        if "cd" in self.images:
            return str(self.images["cd"].get("uri") or
                       self.params.get("cd_image", ""))
        return "" if self.cd_changed else str(self.params.get("cd_image", ""))

    @property
    def pending_saves(self) -> tuple[str, ...]:
        """Slots that still have to reach their save target."""
        return tuple(slot for slot in SAVED_SLOTS
                     if self.save_to.get(slot) and slot not in self.saved)


def check(vm: VMRecord, event_type: str, action: str | None = None) -> None:
    """Refuse an event the VM's status does not allow (409 for requests)."""
    allowed = ALLOWED[event_type]
    if vm.status not in allowed:
        raise WrongState(vm.label, action or f"apply {event_type!r} to",
                         vm.status.value,
                         sorted(s.value for s in allowed))


def apply(vm: VMRecord | None, event: Mapping[str, object]) -> VMRecord:
    """Return the record after ``event``; raise WrongState if not allowed."""
    etype = event["type"]
    ts = float(event["ts"])
    if etype == "snapshot":
        if vm is not None:
            raise WrongState(vm.label, "restore a snapshot of", vm.status.value, [])
        return from_dict(event["record"])
    if etype == "accepted":
        if vm is not None:
            raise WrongState(vm.label, "accept", vm.status.value, [])
        params = dict(event["params"])
        return VMRecord(
            uuid=str(event["uuid"]), name=str(params["name"]), params=params,
            status=S.STARTING, message="accepted; fetching images",
            created=ts, updated=ts,
            save_to={slot: str(params.get(f"{slot}_save_to") or "")
                     for slot in SAVED_SLOTS})
    if vm is None:
        raise KeyError(f"event {etype!r} for unknown VM {event.get('uuid')}")
    check(vm, etype)
    return _transition(vm, event, ts)


def _transition(vm: VMRecord, ev: Mapping[str, object], ts: float) -> VMRecord:
    etype = ev["type"]
    def r(record: VMRecord, **changes) -> VMRecord:
        return _replace(record, updated=ts, **changes)
    if etype == "image_fetched":
        images = dict(vm.images)
        images[str(ev["slot"])] = _image_fields(ev)
        return r(vm, images=images, message=f"fetched {ev['slot']} image")
    if etype == "spawned":
        return r(vm, pid=int(ev["pid"]), create_time=float(ev["create_time"]),
                 message="QEMU started; waiting for its monitor")
    if etype == "install_started":
        return r(vm, status=S.INSTALLING, vnc="",
                 message="guest agent installing software")
    if etype == "running":
        return r(vm, status=S.RUNNING, vnc=str(ev.get("vnc", "")),
                 vnc_password=str(ev.get("vnc_password", "")),
                 message="running")
    if etype == "start_failed":
        return r(vm, status=S.FAILED_TO_START, vnc="",
                 message=str(ev["reason"]))
    if etype == "suspended":
        return r(vm, status=S.SUSPENDED, message="suspended")
    if etype == "resumed":
        return r(vm, status=S.RUNNING, message="running")
    if etype == "modified":
        save_to = dict(vm.save_to)
        for slot in SAVED_SLOTS:
            key = f"{slot}_save_to"
            if key in ev:
                save_to[slot] = str(ev[key])
        return r(vm, save_to=save_to)
    if etype == "cd_changed":
        images = dict(vm.images)
        if ev.get("path"):
            images["cd"] = _image_fields(ev)
        else:
            images.pop("cd", None)
        return r(vm, images=images, cd_changed=True)
    if etype == "halted":
        reason = str(ev["reason"])
        halted = r(vm, vnc="", halt_reason=reason)
        if halted.pending_saves:
            return r(halted, status=S.SAVING,
                     message=f"halted ({reason}); saving images")
        return r(halted, status=S.STOPPED,
                 message=f"halted ({reason}); no image to save")
    if etype == "save_attempt":
        tries = dict(vm.save_tries)
        slot = str(ev["slot"])
        tries[slot] = int(ev["try"])
        error = ev.get("error")
        msg = (f"saving {slot}: try {ev['try']} failed: {error}" if error
               else f"saving {slot}: try {ev['try']}")
        return r(vm, save_tries=tries, message=msg)
    if etype == "saved":
        saved = dict(vm.saved)
        saved[str(ev["slot"])] = str(ev["target"])
        done = r(vm, saved=saved)
        if done.pending_saves:
            return r(done, message=f"saved {ev['slot']} to {ev['target']}")
        where = "; ".join(f"{k} saved to {v}" for k, v in sorted(saved.items()))
        return r(done, status=S.STOPPED,
                 message=f"halted ({vm.halt_reason}); {where}")
    if etype == "save_failed":
        return r(vm, status=S.FAILED_TO_SAVE, message=str(ev["reason"]))
    if etype == "destroyed":
        return r(vm, status=S.DESTROYED, vnc="",
                 message="destroyed on request; nothing saved")
    raise KeyError(f"unknown event type {etype!r}")


_FIELDS = frozenset(f.name for f in dataclasses.fields(VMRecord))


def _replace(record: VMRecord, **changes) -> VMRecord:
    """``dataclasses.replace`` for one copy per event, five times faster.

    Replay folds a million events at start-up; ``dataclasses.replace``
    rebuilds the keyword arguments of ``__init__`` and sets 17 fields one
    by one through ``object.__setattr__`` (frozen): 60 % of the fold. The
    record has no ``__post_init__`` to skip, and the field names are
    still checked.
    """
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"VMRecord has no field {sorted(unknown)}")
    new = object.__new__(VMRecord)
    new.__dict__.update(record.__dict__)
    new.__dict__.update(changes)
    return new


def to_dict(vm: VMRecord) -> dict:
    """The record as plain JSON data (for compaction snapshots)."""
    out = dataclasses.asdict(vm)
    out["status"] = vm.status.value
    return out


def from_dict(data: Mapping[str, object]) -> VMRecord:
    fields = {f.name for f in dataclasses.fields(VMRecord)}
    values = {k: v for k, v in data.items() if k in fields}
    values["status"] = Status(values["status"])
    return VMRecord(**values)


def snapshot_event(vm: VMRecord) -> dict:
    return {"type": "snapshot", "uuid": vm.uuid, "ts": vm.updated,
            "record": to_dict(vm)}


def _image_fields(ev: Mapping[str, object]) -> dict:
    """What an image event says of the disk: path, format, base, sha256 …"""
    return {k: v for k, v in ev.items()
            if k not in ("type", "uuid", "ts", "slot")}


def fold(events: Iterable[Mapping[str, object]]) -> dict[str, VMRecord]:
    """Fold a sequence of events into records keyed by uuid (replay)."""
    vms: dict[str, VMRecord] = {}
    for event in events:
        uuid = str(event["uuid"])
        vms[uuid] = apply(vms.get(uuid), event)
    return vms
