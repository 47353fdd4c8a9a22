#!/usr/bin/env python3
"""Block jobs, live snapshots and transactions over QMP: one session, run
unchanged against blockgraph's storage_daemon and against
qemu-storage-daemon; prints what it observed as one JSON document.

tests/storage_daemon.rs prepares WORKDIR (see `jobs_images` there: the
chain base <- mid <- top, the chain cbase <- ctop, disks a, b, solo, the
overlay ov over solo, ref.raw = what top reads, a0.raw = what a reads),
starts each daemon with the same command line (d0 on disk.qcow2, a monitor
on QMP_SOCKET), runs this script against each and compares the documents.

What is recorded is what both daemons must agree on: results, error
classes and descriptions, job statuses in order (a drain may pause and
resume a job at any time in either daemon, so `paused`/`running` pairs
after the first `running` are recorded apart), event contents, node
fields, and after the daemon has exited, the image files as qemu-img sees
them (backing chains, check, compare). Meanwhile qemu-io writes through
the NBD export of the disk being streamed; those writes must be in the
result. Every wait has a deadline; a missed one fails the script (and
the test, which kills the daemon).

Usage: jobs.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import sys
import time

from qemu.qmp import ExecuteError, QMPClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, TIMEOUT, job_events, job_shape, run  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]


def rel(path):
    if isinstance(path, str) and path.startswith(W + "/"):
        return path[len(W) + 1:]
    return path


def filename(name):
    """A node's filename: QEMU writes a json:{...} one for a node whose
    backing was attached after it was opened (blockdev-snapshot of an
    overlay added with "backing": null); ours keeps the image's name.
    Compared as the image's file name (its "file" member's)."""
    if isinstance(name, str) and name.startswith("json:"):
        return rel(json.loads(name[5:]).get("file", {}).get("filename"))
    return rel(name)


def url(name):
    return f"nbd+unix:///{name}?socket={NBD}"


def guest_write(name, *cmds):
    """qemu-io through the NBD export `name` (the guest), and the same
    writes on what `name` must read afterwards (`reference`)."""
    args = []
    for c in cmds:
        args += ["-c", c]
    return run("qemu-io", "-f", "raw", url(name), *args)[0]


def chain(image, *opts):
    code, out = run("qemu-img", "info", *opts, "--backing-chain", "--output=json",
                    f"{W}/{image}")
    if code != 0:
        return [code, out]
    return [[rel(i.get("filename")), rel(i.get("full-backing-filename")),
             i.get("backing-filename-format"), i.get("virtual-size")]
            for i in json.loads(out)]


async def main():
    rec = {}
    events = []
    c = QMPClient("jobs")
    await asyncio.wait_for(c.connect(QMP), TIMEOUT)

    async def collect():
        async for ev in c.events:
            events.append((ev["event"], ev["data"]))
    collector = asyncio.create_task(collect())

    async def ex(cmd, args=None):
        try:
            r = await asyncio.wait_for(c.execute(cmd, args or {}), TIMEOUT)
            return {"return": r}
        except ExecuteError as e:
            return {"error": e.error_class, "desc": str(e)}

    async def wait_for(what, pred):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for e in events:
                if pred(e):
                    return e
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {what} within {TIMEOUT}s; events: {events}")

    def status_event(job, status):
        return lambda e: (e[0] == "JOB_STATUS_CHANGE" and e[1]["id"] == job
                          and e[1]["status"] == status)

    async def nodes():
        lst = (await ex("query-named-block-nodes", {"flat": True}))["return"]
        out = []
        for n in lst:
            img = n.get("image", {})
            out.append({
                "node-name": "#auto" if n["node-name"].startswith("#") else n["node-name"],
                "drv": n["drv"], "ro": n["ro"], "file": filename(n["file"]),
                "backing-filename": rel(img.get("backing-filename")),
                # A file node's size is its image's layout: qcow2 files
                # we create are laid out differently (see notes).
                "virtual-size": (img.get("virtual-size") if n["drv"] != "file"
                                 else "host file"),
            })
        return sorted(out, key=lambda x: json.dumps(x, sort_keys=True))

    async def backing_depth(node):
        lst = (await ex("query-named-block-nodes", {"flat": False}))["return"]
        for n in lst:
            if n["node-name"] == node:
                img, names = n["image"], []
                while "backing-image" in img:
                    img = img["backing-image"]
                    names.append(rel(img["filename"]))
                return [n["backing_file_depth"], names]
        return None

    def qcow2(name, backing=True):
        node = {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"{W}/{name}.qcow2"}}
        if not backing:
            node["backing"] = None
        return node

    rec["commands"] = sorted(
        n for n in (x["name"] for x in (await ex("query-commands"))["return"])
        if n in ("block-stream", "query-jobs", "query-block-jobs", "job-pause",
                 "job-resume", "job-cancel", "job-complete", "job-finalize",
                 "job-dismiss", "block-job-set-speed", "blockdev-snapshot",
                 "blockdev-snapshot-sync", "transaction"))
    rec["setup"] = [
        await ex("blockdev-add", qcow2("top")),
        await ex("blockdev-add", qcow2("ctop")),
        await ex("blockdev-add", qcow2("a")),
        await ex("blockdev-add", qcow2("b")),
        await ex("blockdev-add", qcow2("solo")),
        await ex("blockdev-add", qcow2("ov", backing=False)),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e-top", "node-name": "top",
                                      "name": "top", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e-a", "node-name": "a",
                                      "name": "a", "writable": True}),
        # b is in use too: QEMU drops an overlay nobody holds (see notes).
        await ex("block-export-add", {"type": "nbd", "id": "e-b", "node-name": "b",
                                      "name": "b"}),
    ]
    rec["jobs-at-start"] = [await ex("query-jobs"), await ex("query-block-jobs")]
    before = await nodes()

    # ---- transaction: two disks at one instant, all or nothing ----------
    def sync(node, snap):
        return {"type": "blockdev-snapshot-sync",
                "data": {"node-name": node, "snapshot-file": f"{W}/{snap}.qcow2",
                         "snapshot-node-name": snap, "format": "qcow2"}}
    rec["transaction-refused"] = [
        await ex("transaction", {"actions": [sync("a", "sa"), sync("nonexistent", "sx")]}),
        await ex("transaction", {"actions": [sync("a", "sa"), {"type": "abort", "data": {}}]}),
        await ex("transaction", {"actions": [sync("a", "sa"), sync("a", "sa2")]}),
        await ex("transaction", {"actions": [sync("a", "sa")],
                                 "properties": {"completion-mode": "grouped"}}),
        await ex("transaction", {"actions": [{"type": "bogus", "data": {}}]}),
        await ex("transaction", {"actions": []}),
        await ex("blockdev-snapshot-sync", {"node-name": "a",
                                            "snapshot-file": f"{W}/sx.qcow2"}),
        await ex("blockdev-snapshot-sync", {"node-name": "a", "snapshot-node-name": "b",
                                            "snapshot-file": f"{W}/sx.qcow2"}),
    ]
    rec["transaction-refused-changes-nothing"] = (await nodes()) == before
    rec["transaction"] = await ex("transaction", {"actions": [sync("a", "sa"), sync("b", "sb")]})
    after = await nodes()
    rec["transaction-nodes"] = [n for n in after if n["node-name"] in ("a", "b", "sa", "sb")]
    rec["transaction-chains"] = [await backing_depth("sa"), await backing_depth("sb")]
    # The export of a followed it onto sa: the guest writes into sa now.
    rec["write-after-snapshot"] = guest_write("a", "write -P 0x5a 1M 64k", "flush")

    # ---- blockdev-snapshot: an overlay added with backing null ----------
    rec["blockdev-snapshot"] = [
        await ex("blockdev-snapshot", {"node": "nonexistent", "overlay": "ov"}),
        await ex("blockdev-snapshot", {"node": "solo", "overlay": "nonexistent"}),
        await ex("blockdev-snapshot", {"node": "solo", "overlay": "solo"}),
        await ex("blockdev-snapshot", {"node": "solo", "overlay": "top"}),
        await ex("blockdev-snapshot", {"node": "solo", "overlay": "ov"}),
        await ex("blockdev-snapshot", {"node": "a", "overlay": "ov"}),
    ]
    rec["blockdev-snapshot-chain"] = await backing_depth("ov")

    # ---- block-stream: argument errors ----------------------------------
    rec["stream-errors"] = [
        await ex("block-stream", {"job-id": "x", "device": "nonexistent"}),
        await ex("block-stream", {"device": "top"}),
        await ex("block-stream", {"job-id": "1x", "device": "top"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "base-node": "nonexistent"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "base-node": "a"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "base-node": "top"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "base": "nonexistent.qcow2"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "base": "a", "base-node": "b"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "backing-file": "x"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "on-error": "sometimes"}),
        await ex("block-stream", {"job-id": "x", "device": "top", "speed": -1}),
        await ex("block-stream", {"job-id": "x", "device": "top", "bogus": 1}),
        await ex("job-pause", {"id": "nonexistent"}),
        await ex("job-cancel", {"id": "nonexistent"}),
        await ex("block-job-set-speed", {"device": "nonexistent", "speed": 1}),
    ]

    # ---- block-stream of a node without a backing file: a job of nothing
    rec["stream-no-backing"] = await ex("block-stream", {"job-id": "jsolo", "device": "d0"})
    await wait_for("jsolo null", status_event("jsolo", "null"))
    rec["stream-no-backing-events"] = job_events(events, "jsolo")

    # ---- block-stream of top down to base, with guest writes ------------
    rec["stream"] = await ex("block-stream", {"job-id": "j1", "device": "top",
                                              "base": "base.qcow2", "speed": MiB})
    rec["stream-busy"] = [
        await ex("block-stream", {"job-id": "j2", "device": "top"}),
        await ex("block-stream", {"job-id": "j1", "device": "ctop"}),
    ]
    running = job_shape((await ex("query-jobs"))["return"])
    # Right after the start, ours may not have measured the device yet
    # (the job's task runs on its own I/O thread; QEMU's coroutine gets
    # that far before block-stream returns): 0 or the length.
    for j in running:
        j["total-progress"] = j["total-progress"] in (0, 32 * MiB)
    rec["query-jobs-running"] = running
    writes = ["write -P 0x77 5M 64k", "write -P 0x78 20M 1M", "write -P 0x79 10M 4k"]
    rec["guest-writes-during-stream"] = guest_write("top", *writes, "flush")
    rec["reference-writes"] = run("qemu-io", "-f", "raw", f"{W}/ref.raw",
                                  *sum([["-c", w] for w in writes], []))[0]
    rec["pause"] = await ex("job-pause", {"id": "j1"})
    await wait_for("j1 paused", status_event("j1", "paused"))
    paused = (await ex("query-jobs"))["return"]
    rec["query-jobs-paused"] = job_shape(paused)
    bj = (await ex("query-block-jobs"))["return"]
    rec["query-block-jobs-paused"] = [
        {k: v for k, v in j.items() if k not in ("offset", "busy")} for j in bj]
    rec["verbs-while-paused"] = [
        await ex("job-pause", {"id": "j1"}),
        await ex("job-complete", {"id": "j1"}),
        await ex("job-finalize", {"id": "j1"}),
        await ex("job-dismiss", {"id": "j1"}),
        await ex("block-job-set-speed", {"device": "j1", "speed": -1}),
        await ex("job-resume", {"id": "j1"}),
        await ex("job-resume", {"id": "j1"}),
        await ex("block-job-set-speed", {"device": "j1", "speed": 0}),
    ]
    await wait_for("j1 null", status_event("j1", "null"))
    rec["stream-events"] = job_events(events, "j1", paused_by_user=True)
    rec["stream-chain"] = await backing_depth("top")
    # The header names base now (read beside the running daemon: -U).
    rec["stream-chain-file"] = chain("top.qcow2", "-U")
    rec["jobs-after-stream"] = await ex("query-jobs")

    # ---- job-cancel ------------------------------------------------------
    rec["cancel-start"] = await ex("block-stream", {"job-id": "jc", "device": "ctop",
                                                    "speed": 65536, "auto-dismiss": False})
    rec["cancel-duplicate-id"] = await ex("block-stream", {"job-id": "jc", "device": "top"})
    rec["cancel"] = await ex("job-cancel", {"id": "jc"})
    await wait_for("jc concluded", status_event("jc", "concluded"))
    rec["cancel-query"] = job_shape((await ex("query-jobs"))["return"])
    rec["cancel-verbs"] = [
        await ex("job-cancel", {"id": "jc"}),
        await ex("job-pause", {"id": "jc"}),
        await ex("job-dismiss", {"id": "jc"}),
        await ex("job-dismiss", {"id": "jc"}),
    ]
    await wait_for("jc null", status_event("jc", "null"))
    rec["cancel-events"] = job_events(events, "jc")
    rec["cancel-chain-kept"] = await backing_depth("ctop")

    # ---- manual finalize: top (now over base) streamed whole -------------
    rec["finalize-start"] = await ex("block-stream", {"job-id": "jf", "device": "top",
                                                      "auto-finalize": False,
                                                      "auto-dismiss": False})
    await wait_for("jf pending", status_event("jf", "pending"))
    rec["finalize-query"] = job_shape((await ex("query-jobs"))["return"])
    rec["finalize"] = [await ex("job-dismiss", {"id": "jf"}),
                       await ex("job-finalize", {"id": "jf"})]
    await wait_for("jf concluded", status_event("jf", "concluded"))
    rec["dismiss"] = await ex("job-dismiss", {"id": "jf"})
    await wait_for("jf null", status_event("jf", "null"))
    rec["finalize-events"] = job_events(events, "jf")
    rec["finalize-chain"] = await backing_depth("top")
    rec["nodes-at-end"] = await nodes()
    rec["jobs-at-end"] = await ex("query-jobs")

    # ---- the files, once the daemon is gone -----------------------------
    rec["quit"] = await ex("quit")
    collector.cancel()
    try:
        await c.disconnect()
    except EOFError:
        pass  # the daemon closed the connection first
    deadline = time.monotonic() + TIMEOUT
    while run("qemu-img", "info", f"{W}/top.qcow2")[0] != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon still holds top.qcow2")
        time.sleep(0.05)
    images = ["top", "ctop", "a", "b", "sa", "sb", "solo", "ov", "disk"]
    rec["check"] = {i: run("qemu-img", "check", f"{W}/{i}.qcow2")[0] for i in images}
    rec["chains"] = {i: chain(f"{i}.qcow2") for i in images}
    rec["compare"] = {
        # The stream kept every byte, the guest's writes included.
        "top-vs-reference": run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                                f"{W}/top.qcow2", f"{W}/ref.raw")[0],
        # The old top of the snapshot is as it was; the overlay has the
        # write made after it.
        "a-vs-before": run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                           f"{W}/a.qcow2", f"{W}/a0.raw")[0],
        "sa-vs-before": run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                            f"{W}/sa.qcow2", f"{W}/a0.raw")[0],
        "sa-has-write": run("qemu-io", "-f", "qcow2", "-r", f"{W}/sa.qcow2",
                            "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0x55 0 1M")[0],
    }
    # QEMU leaves the files of a refused transaction behind; we remove
    # them (recorded apart, see the test).
    rec["leftover-files"] = sorted(f for f in ("sx.qcow2", "sa2.qcow2")
                                   if os.path.exists(f"{W}/{f}"))
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
