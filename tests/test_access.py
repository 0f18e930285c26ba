"""The API token and where the worker agrees to listen.

With ``api_token`` set, every API call needs it (Bearer or
X-VMWorker-Token), and a wrong or missing one changes nothing. Without a
token the worker refuses a non-loopback address unless ``insecure``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest
import requests

from conftest import ROOT, rfb_security_types

pytestmark = pytest.mark.timeout(60)


def test_every_call_needs_the_token_when_one_is_set(make_worker):
    w = make_worker("api_token = 's3cret-token'\n").start()
    url = w.url + "/vmachines/list"
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"X-VMWorker-Token": "s3cret-toke"},
                    {"Authorization": "Basic s3cret-token"}):
        resp = requests.get(url, headers=headers, timeout=10)
        assert resp.status_code == 401, headers
        assert "token" in resp.json()["message"]
    for headers in ({"Authorization": "Bearer s3cret-token"},
                    {"X-VMWorker-Token": "s3cret-token"}):
        assert requests.get(url, headers=headers, timeout=10).status_code == 200
    # A refused start creates nothing.
    resp = requests.get(w.url + "/vmachines/start", timeout=10, params={
        "name": "x", "cpu_count": 1, "mem_size": 32, "hda_image": "/nope"})
    assert resp.status_code == 401
    assert os.listdir(w.var / "vms") == []


def test_no_public_address_without_a_token():
    var = tempfile.mkdtemp(prefix="vw", dir="/tmp")
    result = subprocess.run(
        [sys.executable, str(ROOT / "worker.py"), "--host", "0.0.0.0",
         "--port", "0", "--var-dir", str(var)],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    shutil.rmtree(var)
    assert result.returncode != 0
    assert "api_token" in result.stderr and "0.0.0.0" in result.stderr


def test_a_configured_vnc_password_is_set_through_qmp_only(make_worker):
    w = make_worker("vnc_password = True\n").start()
    uuid = w.start_vm("locked", w.image("idle"))
    vm = w.wait_for(uuid, "running")
    password = vm["vnc_password"]
    assert len(password) == 8
    host, port = vm["vnc"].rsplit(":", 1)
    assert rfb_security_types(host, int(port)) == b"\x02"  # VNC password
    # Never on a command line, never in a log.
    assert not any(password in arg for arg in psutil.Process(vm["pid"]).cmdline())
    for log in [w.var / "vms" / uuid / "qemu.log", *(w.var / "log").iterdir()]:
        assert password not in log.read_text(errors="replace"), log
    assert password not in w.output()
    # The password survives a worker restart, with the VM.
    w.stop()
    w.start()
    assert w.status(uuid)["vnc_password"] == password
