#!/usr/bin/env python3
"""Active commit over QMP (block-commit whose top is the active layer): one
session, run unchanged against blockgraph's storage_daemon and
qemu-storage-daemon; prints what it observed as one JSON document
(tests/storage_daemon.rs compares them).

The script makes its own images (WORKDIR is fresh): the chain abase <-
amid <- atop, opened by blockdev-add of atop (the backing files from the
headers) and exported over NBD. atop is committed into abase while
qemu-io writes through the export: READY, more writes, query-block-jobs,
job-complete; the export then serves abase (found by its file name: the
node is implicit in both daemons, named differently), more writes land
there. A second chain is committed and cancelled after READY (forced:
nothing pivots, the export stays on the top). After quit: qemu-img check
and compare of abase against a raw reference that got every write, and
of the cancelled chain's top against its own.

Normalised, each where it is done: a job's len/offset (the guest's writes
add work at a rate that depends on timing), ready/standby and
running/paused pairs after the first (QEMU's ready job flips to standby
whenever it drains; ours does not). Not asked: what becomes of the old
top node (QEMU keeps a node blockdev-add made; ours drops what a job
empties, DESIGN.md §14).

Usage: active_commit.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, Session, Work, ready_job_events, run  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
work = Work(W, NBD)


def chain(prefix):
    """prefix-base <- prefix-mid <- prefix-top, with data in each, and
    prefix-ref.raw = what the top reads."""
    b, m, t = (f"{W}/{prefix}-{x}.qcow2" for x in ("base", "mid", "top"))
    run("qemu-img", "create", "-q", "-f", "qcow2", b, "32M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", m, "32M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", t, "32M")
    work.qemu_io(b, "qcow2", ["write -P 0x11 0 16M"])
    work.qemu_io(m, "qcow2", ["write -P 0x22 4M 8M", "write -P 0x23 24M 1M"])
    work.qemu_io(t, "qcow2", ["write -P 0x33 10M 1M", "write -P 0x34 30M 64k"])
    run("qemu-img", "convert", "-O", "raw", t, f"{W}/{prefix}-ref.raw")


def guest(export, ref, writes):
    """Writes through the export and into the reference; qemu-io's rc."""
    work.qemu_io(f"{W}/{ref}", "raw", writes)
    return work.qemu_io(work.url(export), "raw", writes + ["flush"])


def events(s, job):
    """The job's events in order, as both daemons can agree on them."""

    def numbers(d):
        d["offset"] = "n"
        d["len"] = "n"

    return ready_job_events(s.events, job, numbers)


async def main():
    rec = {}
    s = Session("active-commit")
    await s.connect(QMP)
    ex = s.ex

    async def export_file(eid):
        """The file of the node export eid serves, and its mode."""
        node = None
        for e in (await ex("query-block-exports"))["return"]:
            if e["id"] == eid:
                node = e["node-name"]
        for n in (await ex("query-named-block-nodes", {"flat": True}))["return"]:
            if n["node-name"] == node:
                return [work.rel(n["file"]), n["ro"]]
        return [None, node]

    chain("a")
    chain("c")
    rec["setup"] = [
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "atop", "file": {
            "driver": "file", "filename": f"{W}/a-top.qcow2"}}),
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "ctop", "file": {
            "driver": "file", "filename": f"{W}/c-top.qcow2"}}),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "ea", "node-name": "atop",
                                      "name": "a", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "ec", "node-name": "ctop",
                                      "name": "c", "writable": True}),
    ]
    rec["refused"] = [
        await ex("block-commit", {"job-id": "x", "device": "atop", "backing-file": "y"}),
        await ex("block-commit", {"job-id": "x", "device": "atop", "top-node": "atop",
                                  "base-node": "atop"}),
        await ex("block-commit", {"job-id": "1x", "device": "atop"}),
    ]

    # ---- atop into abase while the guest writes, then job-complete ------
    rec["commit"] = await ex("block-commit", {"job-id": "ac", "device": "atop",
                                              "speed": 8 * MiB})
    rec["while-committing"] = [
        await ex("block-commit", {"job-id": "ac2", "device": "atop"}),
        await ex("blockdev-del", {"node-name": "atop"}),
    ]
    rec["guest-writes-1"] = guest("a", "a-ref.raw",
                                  ["write -P 0x41 1M 64k", "write -P 0x42 28M 1M"])
    rec["set-speed"] = await ex("block-job-set-speed", {"device": "ac", "speed": 0})
    await s.wait_status("ac", "ready")
    rec["guest-writes-2"] = guest("a", "a-ref.raw",
                                  ["write -P 0x43 2M 64k", "write -P 0x44 31M 4k"])
    rec["query-ready"] = [{k: v for k, v in j.items()
                           if k not in ("len", "offset", "busy", "current-progress",
                                        "total-progress")}
                          for j in (await ex("query-block-jobs"))["return"]]
    rec["complete"] = await ex("job-complete", {"id": "ac"})
    await s.wait_status("ac", "null")
    rec["commit-events"] = events(s, "ac")
    rec["export-after-pivot"] = await export_file("ea")
    rec["guest-writes-3"] = guest("a", "a-ref.raw", ["write -P 0x45 3M 64k"])

    # ---- a second chain, cancelled after READY --------------------------
    rec["cancel-start"] = await ex("block-commit", {"job-id": "cc", "device": "ctop"})
    await s.wait_status("cc", "ready")
    rec["guest-writes-c"] = guest("c", "c-ref.raw", ["write -P 0x51 5M 64k"])
    rec["cancel"] = await ex("job-cancel", {"id": "cc"})
    await s.wait_status("cc", "null")
    rec["cancel-events"] = events(s, "cc")
    rec["export-after-cancel"] = await export_file("ec")
    rec["jobs-at-end"] = await ex("query-jobs")

    rec["quit"] = await ex("quit")
    await s.close()
    images = ["a-base", "c-top", "c-mid", "c-base"]
    rec["check"] = work.check_released(images)
    rec["compare"] = {
        # Every byte the guest saw, before, during and after the commit.
        "a-base-vs-reference": work.compare("a-base.qcow2", "a-ref.raw"),
        # A cancelled active commit loses nothing the guest wrote.
        "c-top-vs-reference": work.compare("c-top.qcow2", "c-ref.raw"),
    }
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
