#!/usr/bin/env python3
"""blockdev-mirror and blockdev-backup over QMP: one session, run unchanged
against blockgraph's storage_daemon and qemu-storage-daemon; prints what it
observed as one JSON document (tests/storage_daemon.rs compares them).

The script makes its own images with qemu-img/qemu-io (WORKDIR is fresh):
src.qcow2 (32 MiB, data) mirrored to tgt.qcow2 while qemu-io writes
through the NBD export of src: READY, more writes, job-complete; the
export then serves tgt (query-block-exports, more writes land in tgt
only). c.qcow2 mirrored to c1/c2, cancelled after READY with job-cancel
(forced: BLOCK_JOB_CANCELLED) and block-job-cancel (not forced:
BLOCK_JOB_COMPLETED, no pivot). b.qcow2 with a dirty bitmap: a full
backup while the guest writes (point in time: the writes must not reach
the copy), then more writes and an incremental backup (sync=incremental)
into an image whose backing is the full copy. After quit: qemu-img check
and compare of every result against raw references built with the same
qemu-io writes.

Normalised, each where it is done: job `len`/`offset` of a mirror (the
guest's writes add work at a rate that depends on timing), ready/standby
and running/paused pairs after the first (QEMU's ready mirror flips to
standby whenever it drains; ours does not), node names of jobs' filters.

Usage: mirror.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, Session, Work, ready_job_events, run  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
work = Work(W, NBD)


def img(name, size, writes=()):
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{W}/{name}.qcow2", size)
    run("qemu-img", "create", "-q", "-f", "raw", f"{W}/{name}-ref.raw", size)
    if writes:
        work.qemu_io(f"{W}/{name}.qcow2", "qcow2", writes)
        work.qemu_io(f"{W}/{name}-ref.raw", "raw", writes)


def guest(export, refs, writes):
    """Writes through the export and into each reference; qemu-io's rc."""
    for r in refs:
        work.qemu_io(f"{W}/{r}", "raw", writes)
    return work.qemu_io(work.url(export), "raw", writes + ["flush"])


def events(s, job):
    """The job's events in order, as both daemons can agree on them."""

    def numbers(d):
        d["offset"] = "len" if d["offset"] == d["len"] else "below len"
        # A mirror's len grows with what the guest dirties (timing); an
        # incremental backup's is the bitmap's count in QEMU and the
        # device's length in blockgraph's backup job (a gap, DESIGN.md §14).
        d["len"] = "n" if d["type"] == "mirror" or job == "bi" else d["len"]

    return ready_job_events(s.events, job, numbers)


async def main():
    rec = {}
    s = Session("mirror")
    await s.connect(QMP)
    ex = s.ex

    def qcow2(name, **extra):
        d = {"driver": "qcow2", "node-name": name,
             "file": {"driver": "file", "filename": f"{W}/{name}.qcow2"}}
        d.update(extra)
        return d

    async def export_node(eid):
        for e in (await ex("query-block-exports"))["return"]:
            if e["id"] == eid:
                return e["node-name"]
        return None

    img("src", "32M", ["write -P 0x11 0 8M", "write -P 0x12 20M 4M"])
    img("tgt", "32M")
    img("small", "8M")
    img("c", "16M", ["write -P 0x21 0 16M"])
    img("c1", "16M")
    img("c2", "16M")
    run("cp", f"{W}/c-ref.raw", f"{W}/c-before.raw")
    img("b", "16M", ["write -P 0x31 0 12M"])
    img("full", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2",
        f"{W}/inc.qcow2", "16M")
    rec["listed"] = sorted(c["name"] for c in (await ex("query-commands"))["return"]
                           if c["name"] in ("blockdev-mirror", "blockdev-backup"))
    rec["setup"] = [await ex("blockdev-add", qcow2(n))
                    for n in ("src", "tgt", "small", "c", "c1", "c2", "b", "full")]
    rec["setup"] += [
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e-src", "node-name": "src",
                                      "name": "src", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e-c", "node-name": "c",
                                      "name": "c", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e-b", "node-name": "b",
                                      "name": "b", "writable": True}),
    ]

    def a(**kw):
        return {k.replace("_", "-"): v for k, v in kw.items()}
    m = dict(device="src", target="tgt", sync="full", job_id="x")
    b = dict(device="b", target="full", sync="full", job_id="x")
    rec["errors"] = [
        await ex("blockdev-mirror", {}),
        await ex("blockdev-mirror", a(device="src")),
        await ex("blockdev-mirror", a(device="src", target="tgt")),
        await ex("blockdev-mirror", a(**{**m, "device": "nope"})),
        await ex("blockdev-mirror", a(**{**m, "target": "nope"})),
        await ex("blockdev-mirror", a(**{**m, "target": "src"})),
        await ex("blockdev-mirror", a(**{**m, "sync": "incremental"})),
        await ex("blockdev-mirror", a(**{**m, "sync": "bitmap"})),
        await ex("blockdev-mirror", a(**{**m, "sync": "bogus"})),
        await ex("blockdev-mirror", a(**{**m, "job_id": "1x"})),
        await ex("blockdev-mirror", a(device="src", target="tgt", sync="full")),
        await ex("blockdev-mirror", a(**m, speed=-1)),
        await ex("blockdev-mirror", a(**m, granularity=100)),
        await ex("blockdev-mirror", a(**m, granularity=3000)),
        await ex("blockdev-mirror", a(**m, copy_mode="x")),
        await ex("blockdev-mirror", a(**m, on_target_error="x")),
        await ex("blockdev-mirror", a(**m, bogus=1)),
        await ex("blockdev-backup", {}),
        await ex("blockdev-backup", a(device="b", target="full")),
        await ex("blockdev-backup", a(**{**b, "device": "nope"})),
        await ex("blockdev-backup", a(**{**b, "target": "nope"})),
        await ex("blockdev-backup", a(**{**b, "target": "b"})),
        await ex("blockdev-backup", a(**{**b, "target": "small"})),
        await ex("blockdev-backup", a(**{**b, "sync": "incremental"})),
        await ex("blockdev-backup", a(**{**b, "sync": "bitmap"})),
        await ex("blockdev-backup", a(**{**b, "sync": "bitmap"}, bitmap="nope")),
        await ex("blockdev-backup", a(**b, bitmap_mode="always")),
        await ex("blockdev-backup", a(**b, bitmap_mode="x")),
        await ex("blockdev-backup", a(**{**b, "job_id": "1x"})),
        await ex("blockdev-backup", a(**b, speed=-1)),
        await ex("blockdev-backup", a(**b, bogus=1)),
    ]
    rec["no-jobs-after-errors"] = await ex("query-jobs")

    # ---- mirror src -> tgt while the guest writes, then pivot ------------
    rec["mirror"] = await ex("blockdev-mirror", a(job_id="m1", device="src", target="tgt",
                                                  sync="full", speed=8 * MiB))
    rec["while-mirroring"] = [
        await ex("blockdev-mirror", a(job_id="m2", device="src", target="small",
                                      sync="full")),
        await ex("blockdev-backup", a(job_id="m2", device="tgt", target="small",
                                      sync="full")),
        await ex("blockdev-mirror", a(job_id="m1", device="c", target="c1", sync="full")),
    ]
    rec["guest-writes-1"] = guest("src", ["src-ref.raw"],
                                  ["write -P 0x13 1M 64k", "write -P 0x14 28M 1M"])
    rec["set-speed"] = await ex("block-job-set-speed", {"device": "m1", "speed": 0})
    await s.wait_status("m1", "ready")
    rec["guest-writes-2"] = guest("src", ["src-ref.raw"],
                                  ["write -P 0x15 2M 64k", "write -P 0x16 30M 4k"])
    rec["query-ready"] = [{k: v for k, v in j.items()
                           if k not in ("len", "offset", "busy", "current-progress",
                                        "total-progress")}
                          for j in (await ex("query-block-jobs"))["return"]]
    rec["complete"] = await ex("job-complete", {"id": "m1"})
    await s.wait_status("m1", "null")
    rec["mirror-events"] = events(s, "m1")
    rec["export-after-pivot"] = await export_node("e-src")
    # From now on the guest writes into tgt only.
    run("cp", f"{W}/src-ref.raw", f"{W}/src-before-pivot.raw")
    rec["guest-writes-3"] = guest("src", ["src-ref.raw"], ["write -P 0x17 3M 64k"])
    rec["src-free-again"] = await ex("blockdev-del", {"node-name": "src"})

    # ---- cancel after READY: forced and not ----------------------------
    for job, target, verb, args in (("mc1", "c1", "job-cancel", {"id": "mc1"}),
                                    ("mc2", "c2", "block-job-cancel", {"device": "mc2"})):
        rec[f"{job}-start"] = await ex("blockdev-mirror", a(
            job_id=job, device="c", target=target, sync="full", copy_mode="write-blocking"))
        await s.wait_status(job, "ready")
        rec[f"{job}-synced"] = [j.get("actively-synced")
                                for j in (await ex("query-block-jobs"))["return"]]
        rec[f"{job}-cancel"] = await ex(verb, args)
        await s.wait_status(job, "null")
        rec[f"{job}-events"] = events(s, job)
        rec[f"{job}-export"] = await export_node("e-c")
    rec["guest-writes-c"] = guest("c", ["c-ref.raw"], ["write -P 0x22 0 64k"])

    # ---- full backup while the guest writes, then an incremental one -----
    rec["bitmap-add"] = await ex("block-dirty-bitmap-add", {"node": "b", "name": "bm"})
    run("cp", f"{W}/b-ref.raw", f"{W}/full-ref.raw")
    rec["backup-full"] = await ex("blockdev-backup", a(
        job_id="bf", device="b", target="full", sync="full", speed=4 * MiB,
        auto_dismiss=False))
    # (QEMU lets a second backup of b start now; ours refuses it as busy:
    # not asked.)
    rec["guest-writes-b1"] = guest("b", ["b-ref.raw"],
                                   ["write -P 0x32 1M 64k", "write -P 0x33 13M 128k"])
    rec["backup-speed"] = await ex("block-job-set-speed", {"device": "bf", "speed": 0})
    await s.wait_status("bf", "concluded")
    rec["backup-full-query"] = [{k: v for k, v in j.items() if k != "busy"}
                                for j in (await ex("query-block-jobs"))["return"]]
    rec["backup-dismiss"] = await ex("job-dismiss", {"id": "bf"})
    await s.wait_status("bf", "null")
    rec["backup-full-events"] = events(s, "bf")
    rec["guest-writes-b2"] = guest("b", ["b-ref.raw"], ["write -P 0x34 5M 64k"])
    run("cp", f"{W}/b-ref.raw", f"{W}/inc-ref.raw")
    rec["full-del"] = await ex("blockdev-del", {"node-name": "full"})
    rec["inc-add"] = await ex("blockdev-add", qcow2("inc", backing=None))

    async def bitmap_count():
        for n in (await ex("query-named-block-nodes", {"flat": True}))["return"]:
            if n["node-name"] == "b":
                return [(x["name"], x["count"], x["busy"]) for x in n.get("dirty-bitmaps", [])]
    rec["bitmap-before-inc"] = await bitmap_count()
    rec["backup-inc"] = await ex("blockdev-backup", a(
        job_id="bi", device="b", target="inc", sync="incremental", bitmap="bm"))
    await s.wait_status("bi", "null")
    rec["backup-inc-events"] = events(s, "bi")
    rec["bitmap-after-inc"] = await bitmap_count()
    rec["jobs-at-end"] = await ex("query-jobs")

    # ---- the files, once the daemon is gone -----------------------------
    rec["quit"] = await ex("quit")
    await s.close()
    images = ["src", "tgt", "c", "c1", "c2", "b", "full", "inc"]
    rec["check"] = work.check_released(images)
    rec["compare"] = {
        # Every write the guest made, before and after the pivot.
        "tgt-vs-guest": work.compare("tgt.qcow2", "src-ref.raw"),
        # src stopped at the pivot.
        "src-vs-before-pivot": work.compare("src.qcow2", "src-before-pivot.raw"),
        # Both cancelled mirrors copied everything (they were ready).
        "c1-vs-c": work.compare("c1.qcow2", "c-before.raw"),
        "c2-vs-c": work.compare("c2.qcow2", "c-before.raw"),
        "c-vs-guest": work.compare("c.qcow2", "c-ref.raw"),
        # Point in time: the writes during the backup are not in it.
        "full-vs-start": work.compare("full.qcow2", "full-ref.raw"),
        # full + inc: b when the incremental backup started.
        "inc-vs-start": work.compare("inc.qcow2", "inc-ref.raw"),
        "b-vs-guest": work.compare("b.qcow2", "b-ref.raw"),
    }
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
