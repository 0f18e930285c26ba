"""The config file: every key documented, every wrong key or value refused.

``worker.conf.example`` must list every ``WorkerConfig`` key with its
default; a config file with an unknown key, a value of the wrong kind, or a
[global] setting CherryPy would silently ignore stops the worker before it
does anything (exit 2), with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT
from vmworker import app, config
from vmworker.errors import ConfigError

sys.path.insert(0, str(ROOT))
import worker  # noqa: E402

pytestmark = pytest.mark.timeout(30)

EXAMPLE = ROOT / "worker.conf.example"


def load(tmp_path, text: str, *flags: str):
    path = tmp_path / "worker.conf"
    path.write_text(text)
    return worker.load_config(worker.parse_args(["--config", str(path), *flags]))


def test_the_example_lists_every_key_with_its_default(tmp_path):
    text = EXAMPLE.read_text()
    keys = {line.split("=")[0].strip() for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith("#")}
    for field in dataclasses.fields(config.WorkerConfig):
        assert field.name in keys, f"worker.conf.example lacks {field.name}"
    server, cfg = worker.load_config(worker.parse_args(["--config", str(EXAMPLE)]))
    defaults = config.WorkerConfig()
    assert cfg.var == defaults.var and cfg.log_path == defaults.log_path
    for field in dataclasses.fields(config.WorkerConfig):
        if field.name not in ("var_dir", "log_file"):
            assert getattr(cfg, field.name) == getattr(defaults, field.name), \
                field.name
    for key, value in app.SERVER_DEFAULTS.items():
        assert server[key] == value, key


def test_flags_override_the_file_and_paths_become_absolute(tmp_path):
    server, cfg = load(tmp_path, "[global]\nserver.socket_port = 9000\n"
                       "[worker]\nvar_dir = 'a'\nlog_file = 'x.log'\n"
                       "storage_roots = 'img, save'\n",
                       "--port", "9001", "--host", "0.0.0.0")
    assert server["server.socket_port"] == 9001
    assert server["server.socket_host"] == "0.0.0.0"
    assert cfg.var_dir.startswith("/") and cfg.var_dir.endswith("/a")
    assert cfg.log_file == cfg.var_dir + "/x.log"
    assert all(r.startswith("/") for r in cfg.storage_roots)


@pytest.mark.parametrize("text, named", [
    ("[worker]\ncpu_overcommitt = 2.0\n", "'cpu_overcommitt'"),
    ("[worker]\ncpu_overcommit = 'lots'\n", "cpu_overcommit must be a number"),
    ("[worker]\nlog_backups = 1.5\n", "log_backups must be a whole number"),
    ("[worker]\nlog_max_bytes = -1\n", "log_max_bytes must not be negative"),
    ("[worker]\nlog_level = 'LOUD'\n", "log_level must be one of"),
    ("[worker]\naccel = 'xen'\n", "accel must be one of"),
    ("[worker]\nvar_dir = '/tmp/" + "x" * 60 + "'\n", "var_dir"),
    ("[global]\nserver.socket_prot = 8090\n", "'server.socket_prot'"),
    ("[global]\nsocket_port = 8090\n", "'socket_port'"),
    ("[global]\nserver.socket_port = 'http'\n", "server.socket_port must be a whole number"),
    ("[global]\nserver.socket_port = 80900\n", "server.socket_port must be a port"),
    ("[server]\nsocket_port = 8090\n", "unknown section [server]"),
    ("[worker]\nvnc_listen = 0.0.0.0\n", "vnc_listen"),
])
def test_a_wrong_key_or_value_is_refused_by_name(tmp_path, text, named):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert named in str(err.value)


def test_the_worker_refuses_to_start_before_detaching(tmp_path):
    conf = tmp_path / "worker.conf"
    conf.write_text("[worker]\nsupervisor_intervall = 1.0\n")
    pidfile = tmp_path / "w.pid"
    done = subprocess.run(
        [sys.executable, str(ROOT / "worker.py"), "--config", str(conf),
         "--daemon", "--pidfile", str(pidfile), "--var-dir",
         str(tmp_path / "var")],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "unknown key 'supervisor_intervall' in [worker]" in done.stderr
    assert not pidfile.exists() and not (tmp_path / "var").exists()
