"""The libvirt peer's client, run by Debian's python3 (python3-libvirt).

Not imported by the harness: ``libvirtrow.py`` runs it as a child process
with ``/usr/bin/python3`` (the venv has no libvirt binding) and talks to it
over stdin/stdout, one JSON line per command, so that libvirt starts can be
interleaved with the worker's:

    create NAME   createXML of the domain (XML template, ``@NAME@`` replaced)
                  → {"ms": createXML returned, "state_ms": state() running,
                     "pid": QEMU's pid}
    destroy NAME  → {"ms": virDomainDestroy returned}
    quit
"""

import json
import sys
import time

import libvirt


def main() -> int:
    uri, xml_file = sys.argv[1], sys.argv[2]
    with open(xml_file) as f:
        template = f.read()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # no stderr spam
    conn = libvirt.open(uri)
    domains = {}
    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        try:
            if cmd == "create":
                xml = template.replace("@NAME@", name)
                t0 = time.perf_counter()
                dom = conn.createXML(xml, 0)
                created = time.perf_counter()
                while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                    time.sleep(0.001)
                running = time.perf_counter()
                domains[name] = dom
                pid = 0
                try:
                    with open(f"/run/libvirt/qemu/{name}.pid") as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pass
                out = {"ms": (created - t0) * 1e3,
                       "state_ms": (running - t0) * 1e3, "pid": pid}
            elif cmd == "destroy":
                dom = domains.pop(name)
                t0 = time.perf_counter()
                dom.destroy()
                out = {"ms": (time.perf_counter() - t0) * 1e3}
            elif cmd == "quit":
                break
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except libvirt.libvirtError as err:
            out = {"error": str(err)}
        print(json.dumps(out), flush=True)
    for dom in domains.values():  # never leave a domain running
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
