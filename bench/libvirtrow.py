"""Start latency vs libvirt's ``createXML`` (issue 7).

The bench runs libvirt itself: when ``libvirtd``/``virtlogd`` or the
Python binding are missing it tries Debian's packages (libvirt-daemon,
libvirt-daemon-driver-qemu, libvirt-clients, python3-libvirt), writes
``/etc/libvirt/qemu.conf`` so QEMU runs as root without namespaces or
cgroups (a copy of a different existing file is kept next to it), creates
the ``libvirt-qemu`` system user libvirtd insists on parsing before it
reads that file, then starts virtlogd and libvirtd as its own children and
stops them by pid at the end. A libvirtd that is already running (not ours)
is left alone and the row says so.

The domain matches the worker's VM: the same boot-sector image (raw, IDE),
32 MB, 1 vCPU, VNC on 127.0.0.1, VGA, no network, no USB, no balloon. The
createXML calls run in ``libvirt_create.py`` under Debian's python3 (the
binding is built for it), interleaved with the worker's starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from xml.sax.saxutils import escape

import psutil

from .context import Context
from .procs import CHILDREN, pid_state, wait_dead
from .results import Measure, Row, Target
from .workerproc import ROOT

MS = 1000.0
URI = "qemu:///system"
SOCKET = "/run/libvirt/libvirt-sock"
QEMU_CONF = "/etc/libvirt/qemu.conf"
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
            "python3-libvirt"]
CONF = """\
# Written by vmworker's benchmark (bench/libvirtrow.py): QEMU runs as root,
# without namespaces or cgroups, as the worker does on this machine.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
cgroup_controllers = [ ]
security_driver = "none"
"""
PREFIX = "vwb-lv-"


class Unavailable(RuntimeError):
    """libvirt cannot run here; the message is the one sentence the row shows."""


def _have() -> bool:
    if not all(os.path.exists(p) for p in
               ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd", SYSTEM_PYTHON)):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import libvirt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def ensure_installed() -> str:
    """Install Debian's libvirt when missing; return what was done."""
    if _have():
        return "already installed"
    if not shutil.which("apt-get"):
        raise Unavailable("libvirt is not installed and there is no apt-get "
                          "to install it.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.run(["apt-get", "install", "-y", "-qq",
                          "--no-install-recommends", *PACKAGES],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 or not _have():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"installing libvirt failed (apt-get exit "
                          f"{out.returncode}: {last}).")
    return "installed by this run with apt-get"


def configure() -> list[str]:
    done = []
    os.makedirs(os.path.dirname(QEMU_CONF), exist_ok=True)
    try:
        with open(QEMU_CONF) as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current != CONF:
        if current is not None:
            shutil.copyfile(QEMU_CONF, QEMU_CONF + ".before-vmworker-bench")
        with open(QEMU_CONF, "w") as f:
            f.write(CONF)
        done.append(f"wrote {QEMU_CONF}")
    if subprocess.run(["getent", "passwd", "libvirt-qemu"],
                      capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "--user-group", "libvirt-qemu"],
                       check=True, capture_output=True)
        done.append("created the libvirt-qemu system user")
    return done


class Daemons:
    """virtlogd and libvirtd as children of the harness, stopped by pid."""

    def __init__(self, base: str):
        self.base = base
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> "Daemons":
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] in ("libvirtd", "virtlogd"):
                raise Unavailable(f"a {proc.info['name']} not started by the "
                                  f"bench is running (pid {proc.pid}); it is "
                                  "left alone and not measured.")
        try:
            self._spawn("virtlogd", ["/usr/sbin/virtlogd"])
            self._spawn("libvirtd", ["/usr/sbin/libvirtd"])
            deadline = time.monotonic() + 60
            while not os.path.exists(SOCKET):
                for what, p in self.procs:
                    if p.poll() is not None:
                        raise Unavailable(f"{what} exited at start: "
                                          f"{self._last_error(what)}")
                if time.monotonic() > deadline:
                    raise Unavailable("libvirtd did not open its socket "
                                      "within 60 s.")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _spawn(self, what: str, argv: list[str]) -> None:
        log = open(os.path.join(self.base, f"{what}.out"), "ab")
        with log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, start_new_session=True)
        CHILDREN.add(p.pid, what)
        self.procs.append((what, p))

    def _last_error(self, what: str) -> str:
        try:
            with open(os.path.join(self.base, f"{what}.out"),
                      errors="replace") as f:
                lines = [l.strip() for l in f if " error : " in l]
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(no error logged)"

    def __exit__(self, *exc) -> None:
        for what, p in reversed(self.procs):  # libvirtd first
            if p.poll() is None:
                CHILDREN.kill(p.pid, sig=signal.SIGTERM, timeout=20)
                CHILDREN.kill(p.pid)
        self.procs = []


def domain_xml(image: str, accel: str) -> str:
    kvm = accel == "kvm"
    return f"""<domain type='{'kvm' if kvm else 'qemu'}'>
  <name>@NAME@</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  {"<cpu mode='host-passthrough'/>" if kvm else ""}
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{escape(shutil.which('qemu-system-x86_64') or 'qemu-system-x86_64')}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(image)}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Client:
    """``libvirt_create.py`` under Debian's python3."""

    def __init__(self, base: str, xml: str):
        self.xml_file = os.path.join(base, "libvirt-domain.xml")
        with open(self.xml_file, "w") as f:
            f.write(xml)
        self.err = open(os.path.join(base, "libvirt-client.err"), "ab")
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, os.path.join(ROOT, "bench", "libvirt_create.py"),
             URI, self.xml_file], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        CHILDREN.add(self.proc.pid, "libvirt client")

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"libvirt client exited on {line!r}")
        body = json.loads(answer)
        if "error" in body:
            raise RuntimeError(f"libvirt {line}: {body['error']}")
        return body

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        CHILDREN.kill(self.proc.pid)
        self.err.close()


def libvirt_row(ctx: Context) -> Row:
    row = Row("libvirt", "Start latency vs libvirt `createXML` (virtlogd + "
                         "libvirtd started by the bench)")
    reps = ctx.pick(3, 10)
    try:
        how = ensure_installed()
        changes = configure()
    except Unavailable as err:
        row.unavailable = str(err)
        return row
    from .vmrows import _worker_start_sample
    ours, created, state, destroy = [], [], [], []
    leaks: list[str] = []
    try:
        with Daemons(ctx.base), ctx.worker("w-libvirt") as w:
            client = Client(ctx.base, domain_xml(w.image, ctx.accel))
            try:
                def lv(name: str) -> None:
                    got = client.ask(f"create {name}")
                    gone = client.ask(f"destroy {name}")
                    if got.get("pid"):
                        wait_dead(got["pid"], 10)
                    if name != PREFIX + "warm":
                        created.append(got["ms"])
                        state.append(got["state_ms"])
                        destroy.append(gone["ms"])

                _worker_start_sample(w, "warm")
                lv(PREFIX + "warm")
                for i in range(reps):
                    steps = [lambda: ours.append(
                                 _worker_start_sample(w, f"l{i}")["ts"] * MS),
                             lambda: lv(f"{PREFIX}{i}")]
                    for step in (steps if i % 2 == 0 else reversed(steps)):
                        step()
                        time.sleep(0.1)
            finally:
                client.close()
                leaks = _kill_libvirt_qemus()
    except Unavailable as err:
        row.unavailable = str(err)
        return row
    ctx.leaks += leaks
    row.measures += [
        Measure("start → `running` (worker's timestamp)", "ms", ours,
                "libvirt `createXML` returned (domain running)", created,
                Target("ratio", "<=", 0.3, "≤ 0.3× libvirt createXML")),
        Measure("start → `running` (same)", "ms", ours,
                "libvirt `createXML` → `state()` says running", state),
        Measure("libvirt `destroy` (informational)", "ms", destroy,
                note="slow here because this sandbox's PID 1 reaps orphans "
                     "slowly (DESIGN.md); no target"),
    ]
    row.notes += [
        f"{reps} rounds after one warm-up of each, worker and libvirt "
        "alternating. libvirt "
        f"{libvirt_version()}, {how}; {'; '.join(changes) or 'configuration already in place'}. "
        "virtlogd and libvirtd were started by the bench and stopped by pid "
        "after the row.",
        "Domain: the worker's boot-sector image (raw, IDE), 32 MB, 1 vCPU, "
        "VNC on 127.0.0.1, VGA, no network, USB or balloon; `createXML` "
        "through the Python binding (bench/libvirt_create.py under Debian's "
        "python3), timed in that process.",
    ]
    return row


def libvirt_version() -> str:
    out = subprocess.run(["/usr/sbin/libvirtd", "--version"],
                         capture_output=True, text=True, timeout=10)
    return (out.stdout.strip().split() or ["?"])[-1]


def _kill_libvirt_qemus() -> list[str]:
    """Any QEMU of a bench domain still alive: killed by pid, reported."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if (argv and "qemu-system" in argv[0]
                and any(f"guest={PREFIX}" in a for a in argv)
                and pid_state(proc.pid) == "alive"):
            found.append(f"libvirt QEMU pid {proc.pid}")
            proc.kill()
    return found
