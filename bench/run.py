#!/usr/bin/env python3
"""Run vmworker's benchmarks side by side with their peers (issue 7).

    python bench/run.py [--quick] [--output FILE] [--rows start,journal]

Prints a table and writes BENCHMARKS.md at the repository root (or
``--output``). ``--quick`` is the one-minute version (fewer rounds, 10 VMs
instead of 100, 10⁵ journal records instead of 10⁶, 10 MB and 256 MB image
bases instead of 10 MB, 1 GB and 4 GB, a 64 MB save instead of 1 GB). The
exit status is 1 when a row could not be produced or a process was left
behind; a row whose peer cannot run here (libvirt) says why instead.

Rows run one after another in a fresh scratch folder under /tmp; each row
starts and stops its own worker. Every process started is stopped by pid,
also on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import (imagerows, journalrow, libvirtrow, machine,  # noqa: E402
                   report, statusrow, supervisorrow, vmrows)
from bench.context import Context  # noqa: E402
from bench.procs import CHILDREN  # noqa: E402
from bench.results import Row  # noqa: E402
from vmworker.hypervisor.qemu import kvm_usable  # noqa: E402

#: The rows, in the order they run. A later row is one more entry here.
ROWS = {
    "start": vmrows.start_row,
    "libvirt": libvirtrow.libvirt_row,
    "destroy": vmrows.destroy_row,
    "concurrency": vmrows.concurrency_row,
    "status": statusrow.status_row,
    # After "status": reports the worker statistics that row sampled.
    "supervisor": supervisorrow.supervisor_row,
    "images": imagerows.image_size_row,
    "save": imagerows.save_row,
    "journal": journalrow.journal_row,
}

#: Rows of issue 7 not measured yet, with their targets (listed in the report).
PENDING: list[tuple[str, str]] = []


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the one-minute version (fewer rounds and VMs)")
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"),
                   help="where to write the report (default BENCHMARKS.md)")
    p.add_argument("--json", help="also write the raw samples here")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                   default=os.environ.get("VMWORKER_BENCH_ACCEL", "auto"))
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch folder (logs) for inspection")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)}")
    return args


def _terminate(signum, frame):
    # Unwind through every ``finally`` so that all processes are stopped.
    raise SystemExit(128 + signum)


def run_rows(ctx: Context, keys: list[str]) -> list[Row]:
    rows = []
    for key in keys:
        print(f"bench: {key} …", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            row = ROWS[key](ctx)
        except Exception as err:  # a failed row is reported, the rest run
            traceback.print_exc()
            row = Row(key, key, error=f"{type(err).__name__}: {err}")
        left = CHILDREN.stop_all()
        if left:
            ctx.leaks += left
        row.seconds = time.monotonic() - started
        print(f"bench: {key} done in {row.seconds:.1f} s", file=sys.stderr,
              flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    accel = args.accel
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    base = tempfile.mkdtemp(prefix="vwb", dir="/tmp")  # short: socket paths
    ctx = Context(quick=args.quick, base=base, accel=accel)
    began = time.monotonic()
    load_at_start = os.getloadavg()[0]
    try:
        ctx.build_guest()
        info = machine.describe(ROOT, base, accel)
        rows = run_rows(ctx, args.rows)
    finally:
        ctx.leaks += CHILDREN.stop_all()
        if args.keep:
            print(f"bench: scratch folder kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    seconds = time.monotonic() - began
    info["load average at end"] = machine.load()
    command = "bench/run.py" + (" --quick" if args.quick else "")
    pending = list(PENDING)
    warning = ""
    # Only the load found at the start is other work: by the end, the
    # 1-minute average is the bench's own (100 guests, 8 journal writers).
    if load_at_start > (os.cpu_count() or 1):
        warning = (f"The machine was busy with other work when this run "
                   f"began (1-minute load average {load_at_start:.1f} on "
                   f"{os.cpu_count()} cores): figures are noisier than usual "
                   "and a ratio near its target may flip between runs; "
                   "read the min–max ranges.")
    text = report.markdown(rows, info, quick=args.quick, command=command,
                           pending=pending, seconds=seconds, leaks=ctx.leaks,
                           warning=warning)
    _write(args.output, text)
    if args.json:
        _write(args.json, json.dumps(
            {"machine": info, "quick": args.quick,
             "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    print(report.text_table(rows))
    if warning:
        print(f"\nnote: {warning}")
    print(f"\nwrote {args.output} ({seconds:.0f} s)")
    if ctx.leaks:
        print(f"processes left behind (killed): {', '.join(ctx.leaks)}",
              file=sys.stderr)
    return 1 if ctx.leaks or any(r.error for r in rows) else 0


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
