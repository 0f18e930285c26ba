"""The worker's own settings: the ``[worker]`` section of the config file.

CherryPy reads ``[global]`` (server settings) itself; everything the worker
needs lives in one frozen ``WorkerConfig`` so that modules receive their
settings explicitly instead of reading globals. A key the worker does not
know, or a value of the wrong type, stops the worker with the key's name.
"""

from __future__ import annotations

import dataclasses
import os

from .errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Unix socket paths are limited to 107 bytes; the longest one the worker
# makes is VAR/vms/<36-char uuid>/qmp-events.sock.
_LONGEST_SUFFIX = len("/vms/") + 36 + len("/qmp-events.sock")
_MAX_SOCKET_PATH = 107


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    #: Runtime data: journal, logs, per-VM folders, image cache, failed
    #: saves. Relative to the working folder; at most 50 characters long.
    var_dir: str = "./var"
    #: Folders from which local images may be read and into which saves may
    #: be written. Empty means VAR/storage.
    storage_roots: tuple[str, ...] = ()
    #: Address QEMU's VNC servers listen on, and that status answers show.
    vnc_listen: str = "127.0.0.1"
    #: First VNC display tried (port 5900 + display); QEMU takes the next
    #: free one up to ``vnc_display_base + vnc_display_count - 1``.
    vnc_display_base: int = 0
    vnc_display_count: int = 1000
    #: Give each VM's VNC server a random password (set through QMP, shown
    #: in the status answer as vnc_password, never on a command line).
    vnc_password: bool = False
    #: ``auto`` uses KVM when /dev/kvm can be opened, else TCG.
    accel: str = "auto"
    #: The QEMU emulator and image tool run (looked up in PATH).
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    #: Seconds QEMU gets from spawn to an answered QMP command.
    qemu_start_timeout: float = 30.0
    #: Seconds a guest gets to stop after SIGTERM before SIGKILL.
    qemu_stop_timeout: float = 10.0
    #: Connect and read timeouts for HTTP(S)/FTP image transfers, seconds.
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 60.0
    #: Size limit of the shared image cache (VAR/images), MB; least
    #: recently used images that no live VM needs are evicted past it.
    #: 0 means no limit.
    image_cache_max_mb: int = 51200
    #: Seconds before the second save try; the third waits twice as long.
    save_backoff: float = 1.0
    #: Past this size (MB) the journal is compacted: one snapshot record
    #: per VM kept, ended VMs older than the retention dropped.
    journal_compact_mb: float = 64.0
    #: Hours an ended VM stays in the journal (and in list/status).
    journal_retention_hours: float = 168.0
    #: How often the supervisor reconciles when no QEMU event wakes it.
    supervisor_interval: float = 1.0
    #: Threads that fetch images and start QEMU.
    start_workers: int = 32
    #: MB of host memory kept for the host itself; admission refuses VMs
    #: that would eat into it.
    memory_reserve_mb: int = 512
    #: MB of free disk under the var dir kept for the host; admission
    #: refuses a VM whose local images would not fit beside it.
    disk_reserve_mb: int = 1024
    #: Memory QEMU itself needs per VM on top of the guest's, MB.
    qemu_overhead_mb: int = 64
    #: Guest vCPUs allowed per host CPU.
    cpu_overcommit: float = 4.0
    #: Bearer token required by every request when set.
    api_token: str = ""
    #: Allow listening on a non-loopback address without an api_token.
    insecure: bool = False
    #: Seconds a web UI login (its HttpOnly session cookie) lasts.
    webui_session_lifetime: float = 43200.0
    #: Seconds a console token, minted when the console page loads, stays
    #: redeemable (once) by that page.
    console_token_lifetime: float = 60.0
    #: Seconds the one-time VNC password set for a console opening can be
    #: used to connect (a connected console stays connected after it).
    console_password_lifetime: float = 30.0
    #: Where Debian's novnc package put noVNC; served as /static/novnc/.
    novnc_dir: str = "/usr/share/novnc"
    #: Least severe level written to the logs: DEBUG, INFO, WARNING, ERROR.
    log_level: str = "INFO"
    #: The worker's log; relative paths are inside the var dir. Empty means
    #: VAR/log/worker.log. The HTTP access log (access.log) lies beside it.
    log_file: str = ""
    #: Size at which a log file is rotated (worker.log -> worker.log.1 ...),
    #: bytes; 0 never rotates (for logrotate, which sends SIGHUP to reopen).
    log_max_bytes: int = 10 << 20
    #: Rotated log files kept (worker.log.1 ... worker.log.N).
    log_backups: int = 5

    def __post_init__(self):
        if self.accel not in ACCELS:
            raise ConfigError(f"accel must be one of {', '.join(ACCELS)}, "
                              f"not {self.accel!r}")
        for name in ("qemu_start_timeout", "qemu_stop_timeout",
                     "fetch_connect_timeout", "fetch_read_timeout",
                     "supervisor_interval", "cpu_overcommit",
                     "webui_session_lifetime", "console_token_lifetime",
                     "console_password_lifetime"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, "
                                  f"not {getattr(self, name)!r}")
        if not 0 <= self.vnc_display_base or self.vnc_display_count < 1:
            raise ConfigError("vnc_display_base must be >= 0 and "
                              "vnc_display_count >= 1")
        if self.journal_compact_mb <= 0 or self.journal_retention_hours < 0:
            raise ConfigError("journal_compact_mb must be positive and "
                              "journal_retention_hours not negative")
        if self.image_cache_max_mb < 0 or self.save_backoff < 0:
            raise ConfigError("image_cache_max_mb and save_backoff must not "
                              "be negative")
        if self.start_workers < 1:
            raise ConfigError("start_workers must be at least 1")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                              f"not {self.log_level!r}")
        for name in ("log_max_bytes", "log_backups"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, "
                                  f"not {getattr(self, name)!r}")

    @property
    def var(self) -> str:
        return os.path.realpath(self.var_dir)

    @property
    def log_path(self) -> str:
        """The worker log's absolute path (``log_file`` or VAR/log/worker.log)."""
        return os.path.join(self.var, self.log_file or
                            os.path.join("log", "worker.log"))

    @property
    def roots(self) -> tuple[str, ...]:
        roots = self.storage_roots or (os.path.join(self.var, "storage"),)
        return tuple(os.path.realpath(r) for r in roots)

    def check_paths(self) -> None:
        """Refuse a var dir whose QMP socket paths would not fit a sockaddr."""
        if len(self.var) + _LONGEST_SUFFIX > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"var_dir {self.var!r} is too long ({len(self.var)} "
                f"characters): QMP socket paths under it would exceed the "
                f"{_MAX_SOCKET_PATH}-byte limit of unix sockets; use a path "
                f"of at most {_MAX_SOCKET_PATH - _LONGEST_SUFFIX} characters")


def from_mapping(section: dict) -> WorkerConfig:
    """Build a config from a ``[worker]`` section, naming any bad key."""
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    values = {}
    for key, value in section.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {key!r} in [worker]; known keys: "
                f"{', '.join(sorted(fields))}")
        default = fields[key].default
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, (list, tuple)):
                value = tuple(str(v) for v in value)
            else:
                raise ConfigError(f"[worker] {key} must be a list of paths, "
                                  f"not {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"[worker] {key} must be True or False, "
                                  f"not {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"[worker] {key} must be a number, "
                                  f"not {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"[worker] {key} must be a whole number, "
                                  f"not {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"[worker] {key} must be a string, "
                              f"not {value!r}")
        values[key] = value
    return WorkerConfig(**values)
