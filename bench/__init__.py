"""vmworker's benchmark harness (issue 7): the worker side by side with peers.

``bench/run.py`` is the one entry point (``make bench``, ``make bench-quick``).
Each row measures the worker and a peer in the same run, interleaved, and
reports medians with min–max and the ratio vmworker / peer: absolute times
drift on these machines from run to run, ratios hold.

Modules, one concern each::

    results.py      what a row produces (Measure, Row, Target) and statistics
    machine.py      the machine a run happened on
    context.py      what every row gets: mode, scratch folder, guest, workers
    procs.py        processes the harness starts: spawn, wait, kill, reap by pid
    rawqemu.py      the raw-QEMU peer: same argv as the worker, spawn → QMP
    workerproc.py   the real worker process and a small client for its API
    vmrows.py       rows that start VMs: start latency, destroy, concurrency
    statusrow.py    the status path under load vs a bare CherryPy endpoint
    loadgen.py      wrk, or a bounded Python load generator
    bare_cherrypy.py  the bare CherryPy peer (run as its own process)
    journalrow.py   journal appends and replay vs SQLite WAL
    libvirtrow.py   start latency vs libvirt createXML (runs virtlogd/libvirtd)
    libvirt_create.py  the libvirt client, run by Debian's python3
    supervisorrow.py  supervisor tick and worker RSS from /worker/stats
    imagerows.py    issue 3: start time vs image size, save throughput
    report.py       the printed table and BENCHMARKS.md
"""
