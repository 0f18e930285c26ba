"""All QMP traffic of the worker, through the qemu.qmp library.

Each VM has two monitors (DESIGN.md): QEMU serves one QMP client per
monitor at a time, so the worker keeps the *event* monitor open for the
VM's whole life (like Proxmox's qmeventd) and uses the *command* monitor
for one short session per command, leaving it free between commands for an
operator's tools.

qemu.qmp is asyncio; one thread owns one event loop that holds every event
session (the pattern of qemu.qmp's own ``legacy`` wrapper, but shared by
all VMs). Other threads call ``execute`` and ``watch``, which run coroutines
on that loop and wait for them. QMP errors are translated to the worker's
own errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Callable

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from ..errors import HypervisorError, QMPCommandError

log = logging.getLogger(__name__)
# qemu.qmp logs every disconnect as an error; a VM halting is routine here.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@dataclasses.dataclass
class WatchState:
    """What the event monitor of one VM has reported so far."""

    connected: bool = True
    runstate: str | None = None
    guest_shutdown: bool = False
    shutdown_reason: str = ""


class QMPHub:
    """One event loop thread holding every VM's QMP sessions."""

    def __init__(self, on_event: Callable[[str, dict], None]):
        self._on_event = on_event
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="qmp",
                                        daemon=True)
        self._watches: dict[str, tuple[QMPClient, asyncio.Task]] = {}
        self._states: dict[str, WatchState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._states_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def close(self) -> None:
        """Close every session; VMs are not touched."""
        if not self._thread.is_alive():
            return
        self._call(self._close_all(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise HypervisorError(f"QMP did not answer within {timeout:g} s") from None

    # -- commands -----------------------------------------------------------

    def execute(self, uuid: str, socket_path: str, command: str,
                arguments: dict | None = None, timeout: float = 10.0):
        """Run one QMP command on the VM's command monitor; return its result."""
        return self._call(self._execute(uuid, socket_path, command, arguments),
                          timeout)

    def execute_many(self, uuid: str, socket_path: str, commands,
                     timeout: float = 10.0) -> list:
        """Run several commands in one monitor session (one greeting)."""
        return self._call(self._execute_many(uuid, socket_path, commands),
                          timeout)

    async def _execute(self, uuid, socket_path, command, arguments):
        return (await self._execute_many(uuid, socket_path,
                                         [(command, arguments)]))[0]

    async def _execute_many(self, uuid, socket_path, commands):
        lock = self._locks.setdefault(uuid, asyncio.Lock())
        async with lock:
            client = QMPClient(f"vm-{uuid}-cmd")
            try:
                await client.connect(socket_path)
            except ConnectError as err:
                raise HypervisorError(
                    f"cannot reach QMP of VM {uuid}: {err.exc or err}") from err
            command = commands[0][0]
            try:
                results = []
                for command, arguments in commands:
                    results.append(await client.execute(command, arguments))
                return results
            except ExecuteError as err:
                raise QMPCommandError(
                    f"QEMU refused {command}: {err.error.desc}") from err
            except (QMPError, OSError, EOFError) as err:
                raise HypervisorError(
                    f"QMP {command} on VM {uuid} failed: {err}") from err
            finally:
                try:
                    await client.disconnect()
                except (QMPError, OSError, EOFError):
                    pass

    # -- events -------------------------------------------------------------

    def watch(self, uuid: str, socket_path: str, commands=(),
              timeout: float = 10.0) -> list:
        """Open the VM's event monitor and keep it open until it closes.

        ``commands`` run on that session right away: at start-up this saves
        a second greeting on the command monitor.
        """
        return self._call(self._watch(uuid, socket_path, commands), timeout)

    def state(self, uuid: str) -> WatchState | None:
        with self._states_lock:
            state = self._states.get(uuid)
            return dataclasses.replace(state) if state else None

    def bookkeeping(self) -> dict[str, int]:
        with self._states_lock:
            states = len(self._states)
        # Read from another thread: len() of a dict is atomic in CPython.
        return {"qmp_watches": len(self._watches),
                "qmp_command_locks": len(self._locks), "qmp_states": states}

    def forget(self, uuid: str) -> None:
        """Close the VM's event session and drop what it reported."""
        if self._thread.is_alive():
            self._call(self._unwatch(uuid), 10)
            self._call(self._drop_lock(uuid), 10)
        with self._states_lock:
            self._states.pop(uuid, None)

    async def _drop_lock(self, uuid):
        # On the loop's thread, like every other use of the command locks.
        self._locks.pop(uuid, None)

    async def _watch(self, uuid, socket_path, commands):
        await self._unwatch(uuid)
        client = QMPClient(f"vm-{uuid}-events")
        try:
            await client.connect(socket_path)
        except ConnectError as err:
            raise HypervisorError(
                f"cannot reach the event monitor of VM {uuid}: "
                f"{err.exc or err}") from err
        with self._states_lock:
            self._states[uuid] = WatchState()
        task = asyncio.ensure_future(self._pump(uuid, client))
        self._watches[uuid] = (client, task)
        try:
            return [await client.execute(command, arguments)
                    for command, arguments in commands]
        except ExecuteError as err:
            raise QMPCommandError(f"QEMU refused a command: {err.error.desc}") from err
        except (QMPError, OSError, EOFError) as err:
            raise HypervisorError(f"QMP on VM {uuid} failed: {err}") from err

    async def _pump(self, uuid: str, client: QMPClient) -> None:
        """Forward events until QEMU closes the monitor (it exited)."""
        get = asyncio.ensure_future(client.events.get())
        changed = asyncio.ensure_future(client.runstate_changed())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {get, changed}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    self._record(uuid, get.result())
                    get = asyncio.ensure_future(client.events.get())
                if changed in done:
                    if client.runstate in (Runstate.DISCONNECTING,
                                           Runstate.IDLE):
                        break
                    changed = asyncio.ensure_future(client.runstate_changed())
            while not client.events.empty():
                self._record(uuid, await client.events.get())
        finally:
            get.cancel()
            changed.cancel()
            try:
                await client.disconnect()
            except (QMPError, OSError, EOFError):
                pass
        with self._states_lock:
            state = self._states.get(uuid)
            if state is not None:
                state.connected = False
        self._notify(uuid, {"event": "DISCONNECTED"})

    def _record(self, uuid: str, event) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        with self._states_lock:
            state = self._states.get(uuid)
            if state is not None:
                if name == "STOP":
                    if state.runstate != "shutdown":
                        state.runstate = "paused"
                elif name == "RESUME":
                    state.runstate = "running"
                elif name == "SHUTDOWN":
                    state.runstate = "shutdown"
                    state.guest_shutdown = bool(data.get("guest"))
                    state.shutdown_reason = str(data.get("reason", ""))
        self._notify(uuid, {"event": name, "data": dict(data)})

    def _notify(self, uuid: str, event: dict) -> None:
        try:
            self._on_event(uuid, event)
        except Exception:  # the callback must not kill the event loop
            log.exception("QMP event callback failed for VM %s", uuid)

    def set_runstate(self, uuid: str, runstate: str) -> None:
        """Seed the cached run state from a ``query-status`` answer."""
        with self._states_lock:
            state = self._states.get(uuid)
            if state is not None and state.runstate is None:
                state.runstate = runstate
                if runstate == "shutdown":
                    state.guest_shutdown = True

    async def _unwatch(self, uuid):
        entry = self._watches.pop(uuid, None)
        if entry is None:
            return
        client, task = entry
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
            pass
        if client.runstate != Runstate.IDLE:
            try:
                await client.disconnect()
            except (QMPError, OSError, EOFError):
                pass

    async def _close_all(self):
        for uuid in list(self._watches):
            await self._unwatch(uuid)
