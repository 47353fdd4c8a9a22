#!/usr/bin/env python3
"""transaction with blockdev-backup and dirty bitmap actions over QMP: one
session, run unchanged against blockgraph's storage_daemon and
qemu-storage-daemon; prints what it observed as one JSON document
(tests/storage_daemon.rs compares them).

The script makes its own images (WORKDIR is fresh): src.qcow2 (16 MiB,
data) exported over NBD, full.qcow2 (the backup target). Refused
transactions (an abort action last, a duplicate bitmap, a missing one,
a bad granularity) leave no bitmap behind and change none. Then QEMU's
incremental backup bootstrap: one transaction starts a full backup of
src into full and adds bitmap bm on src, while qemu-io writes through
the export before and after: bm counts exactly the writes after the
transaction, full holds src as it was at the transaction (compared after
exit). Then clear+disable, enable, merge+remove in transactions, each
observed through query-named-block-nodes.

Usage: transaction.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, Session, Work, run  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
work = Work(W, NBD)


def img(name, size, writes=()):
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{W}/{name}.qcow2", size)
    run("qemu-img", "create", "-q", "-f", "raw", f"{W}/{name}-ref.raw", size)
    if writes:
        work.qemu_io(f"{W}/{name}.qcow2", "qcow2", writes)
        work.qemu_io(f"{W}/{name}-ref.raw", "raw", writes)


def guest(writes):
    """Writes through the export of src and into its reference."""
    work.qemu_io(f"{W}/src-ref.raw", "raw", writes)
    return work.qemu_io(work.url("src"), "raw", writes + ["flush"])


def act(ty, **data):
    return {"type": ty, "data": {k.replace("_", "-"): v for k, v in data.items()}}


async def main():
    rec = {}
    s = Session("transaction")
    await s.connect(QMP)
    ex = s.ex

    async def bitmaps(node):
        """The bitmaps of node: name, count, recording, granularity."""
        for n in (await ex("query-named-block-nodes", {"flat": True}))["return"]:
            if n["node-name"] == node:
                return sorted([b["name"], b["count"], b["recording"], b["granularity"]]
                              for b in n.get("dirty-bitmaps", []))
        return None

    async def tx(*actions):
        r = await ex("transaction", {"actions": list(actions)})
        return r

    img("src", "16M", ["write -P 0x11 0 8M", "write -P 0x12 12M 1M"])
    img("full", "16M")
    rec["setup"] = [
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {
            "driver": "file", "filename": f"{W}/src.qcow2"}}),
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "full", "file": {
            "driver": "file", "filename": f"{W}/full.qcow2"}}),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                      "name": "src", "writable": True}),
        await ex("block-dirty-bitmap-add", {"node": "src", "name": "bx"}),
    ]
    rec["guest-writes-0"] = guest(["write -P 0x21 1M 64k", "write -P 0x22 5M 128k"])
    before = await bitmaps("src")
    rec["bitmaps-before"] = before

    # ---- refused transactions change nothing ----------------------------
    rec["refused"] = [
        await tx(act("block-dirty-bitmap-add", node="src", name="b0"),
                 act("block-dirty-bitmap-clear", node="src", name="bx"),
                 act("abort")),
        await tx(act("block-dirty-bitmap-add", node="src", name="b1"),
                 act("block-dirty-bitmap-add", node="src", name="b1")),
        await tx(act("block-dirty-bitmap-remove", node="src", name="bx"),
                 act("block-dirty-bitmap-clear", node="src", name="bx")),
        await tx(act("block-dirty-bitmap-add", node="src", name="b2"),
                 act("block-dirty-bitmap-disable", node="src", name="nope")),
        await tx(act("block-dirty-bitmap-add", node="src", name="b3", granularity=1000)),
        await tx(act("block-dirty-bitmap-add", node="nowhere", name="b4")),
        await tx(act("block-dirty-bitmap-merge", node="src", target="bx",
                     bitmaps=["b5"])),
        await tx(act("block-dirty-bitmap-add", node="src", name="b6"),
                 act("blockdev-backup", job_id="x", device="src", target="nowhere",
                     sync="full")),
        await tx(act("block-dirty-bitmap-add", node="src", name="b7"),
                 act("block-dirty-bitmap-remove", node="src", name="b7"),
                 act("block-dirty-bitmap-remove", node="src", name="b7")),
    ]
    rec["unchanged-after-refusals"] = (await bitmaps("src")) == before
    rec["no-jobs-after-refusals"] = await ex("query-jobs")

    # ---- a full backup and a new bitmap at one instant ------------------
    run("cp", f"{W}/src-ref.raw", f"{W}/full-ref.raw")
    rec["bootstrap"] = await tx(
        act("blockdev-backup", job_id="bk", device="src", target="full", sync="full",
            speed=4 * MiB),
        act("block-dirty-bitmap-add", node="src", name="bm"),
        act("block-dirty-bitmap-clear", node="src", name="bx"))
    rec["bitmaps-at-bootstrap"] = await bitmaps("src")
    rec["guest-writes-1"] = guest(["write -P 0x31 2M 64k", "write -P 0x32 9M 4k",
                                   "write -P 0x33 15M 192k"])
    rec["set-speed"] = await ex("block-job-set-speed", {"device": "bk", "speed": 0})
    await s.wait_status("bk", "null")
    rec["backup-events"] = [e for e in s.job_events("bk")["sequence"]
                            if not isinstance(e, dict)]
    rec["bitmaps-after-writes"] = await bitmaps("src")

    # ---- more verbs in transactions -------------------------------------
    rec["clear-disable"] = await tx(
        act("block-dirty-bitmap-clear", node="src", name="bx"),
        act("block-dirty-bitmap-disable", node="src", name="bx"))
    rec["guest-writes-2"] = guest(["write -P 0x41 3M 64k"])
    rec["after-clear-disable"] = await bitmaps("src")
    rec["enable-add"] = await tx(
        act("block-dirty-bitmap-enable", node="src", name="bx"),
        act("block-dirty-bitmap-add", node="src", name="bn", granularity=4096,
            disabled=True))
    rec["guest-writes-3"] = guest(["write -P 0x42 7M 64k"])
    rec["after-enable"] = await bitmaps("src")
    rec["merge-remove"] = await tx(
        act("block-dirty-bitmap-merge", node="src", target="bn", bitmaps=["bm", "bx"]),
        act("block-dirty-bitmap-remove", node="src", name="bm"))
    rec["after-merge-remove"] = await bitmaps("src")

    rec["quit"] = await ex("quit")
    await s.close()
    rec["check"] = work.check_released(("src", "full"))
    rec["compare"] = {
        # The backup is src at the transaction: none of the later writes.
        "full-vs-point-in-time": work.compare("full.qcow2", "full-ref.raw"),
        "src-vs-reference": work.compare("src.qcow2", "src-ref.raw"),
    }
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
