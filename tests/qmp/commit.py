#!/usr/bin/env python3
"""block-commit over QMP: one session, run unchanged against blockgraph's
storage_daemon and against qemu-storage-daemon; prints what it observed
as one JSON document.

tests/storage_daemon.rs prepares WORKDIR (see `commit_images` there: the
chain base <- mid <- top, the chain cbase <- cmid <- ctop, solo; ref.raw
= what top reads, base-after.raw = what mid reads (what base must hold
once mid is committed), cref.raw = what ctop reads), starts each daemon
with the same command line (d0 on disk.qcow2, a monitor on QMP_SOCKET),
runs this script against each and compares the documents.

What happens: argument errors (QEMU's words), then mid is committed into
base while the guest (qemu-io) writes through the NBD export of top, the
active layer; the job is paused by the user, queried, resumed and runs
to completion; a second commit (cmid into cbase, named by file names) is
cancelled. After the daemon has exited, the images as qemu-img sees them
(chains, check, compare against references).

Recorded is what both daemons must agree on. Normalised, each for the
reason given where it is done: implicit node names (#blockN: generated
differently, looked up by file name), the job's filter node (QEMU lists
it, ours does not), progress of a running job (timing), the host size of
file nodes (image layout), paused/running pairs a drain causes.

Active commit (top = the active layer) is asked by active_commit.py.

Usage: commit.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, Session, Work, job_shape  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
work = Work(W, NBD)


async def main():
    rec = {}
    s = Session("commit")
    await s.connect(QMP)
    ex = s.ex

    async def node_list():
        return (await ex("query-named-block-nodes", {"flat": True}))["return"]

    async def names():
        """Image file -> node name: the implicit nodes of a chain opened
        from its headers are named #blockN differently by each daemon."""
        return {work.rel(n["file"]): n["node-name"]
                for n in await node_list() if n["drv"] == "qcow2"}

    async def nodes():
        out = []
        for n in await node_list():
            # The job's filter: QEMU lists it (commit_top), ours does not.
            if n["drv"] == "commit_top":
                continue
            img = n.get("image", {})
            out.append({
                "node-name": "#auto" if n["node-name"].startswith("#") else n["node-name"],
                "drv": n["drv"], "ro": n["ro"], "file": work.rel(n["file"]),
                "backing-filename": work.rel(img.get("backing-filename")),
                # A file node's size is its image's layout (see jobs.py).
                "virtual-size": (img.get("virtual-size") if n["drv"] != "file"
                                 else "host file"),
            })
        return sorted(out, key=lambda x: json.dumps(x, sort_keys=True))

    async def backing_depth(node):
        for n in (await ex("query-named-block-nodes", {"flat": False}))["return"]:
            if n["node-name"] == node:
                img, chain = n["image"], []
                while "backing-image" in img:
                    img = img["backing-image"]
                    chain.append(work.rel(img["filename"]))
                return [n["backing_file_depth"], chain]
        return None

    def qcow2(name):
        return {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"{W}/{name}.qcow2"}}

    rec["listed"] = "block-commit" in [
        c["name"] for c in (await ex("query-commands"))["return"]]
    rec["setup"] = [
        await ex("blockdev-add", qcow2("top")),
        await ex("blockdev-add", qcow2("ctop")),
        await ex("blockdev-add", qcow2("solo")),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e-top", "node-name": "top",
                                      "name": "top", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e-ctop", "node-name": "ctop",
                                      "name": "ctop"}),
    ]
    n = await names()
    mid, base = n["mid.qcow2"], n["base.qcow2"]

    def named(results):
        """Implicit node names in error descriptions as the image they
        stand for (each daemon generates its own #blockN)."""
        for r in results:
            if "desc" in r:
                r["desc"] = r["desc"].replace(f"'{mid}'", "'<mid>'").replace(
                    f"'{base}'", "'<base>'")
        return results
    before = await nodes()
    rec["nodes-before"] = before

    # ---- argument errors, in QEMU's order of checks ---------------------
    def commit(**kw):
        return {k.replace("_", "-"): v for k, v in kw.items()}
    rec["errors"] = named([
        await ex("block-commit", {}),
        # DeviceNotFound, looked up first (libvirt probes with it).
        await ex("block-commit", commit(device="nonexistent", job_id="x")),
        await ex("block-commit", commit(device=mid, job_id="x", top_node=mid)),
        await ex("block-commit", commit(device="top", top_node=mid)),
        await ex("block-commit", commit(device="top", job_id="1x", top_node=mid)),
        await ex("block-commit", commit(device="top", job_id="x", top_node="nonexistent")),
        await ex("block-commit", commit(device="top", job_id="x", top_node="solo")),
        await ex("block-commit", commit(device="top", job_id="x", top="nonexistent.qcow2")),
        await ex("block-commit", commit(device="top", job_id="x", top="mid.qcow2",
                                        top_node=mid)),
        await ex("block-commit", commit(device="top", job_id="x", top="mid.qcow2",
                                        base="base.qcow2", base_node=base)),
        await ex("block-commit", commit(device="top", job_id="x", top="mid.qcow2",
                                        base="nonexistent.qcow2")),
        await ex("block-commit", commit(device="top", job_id="x", top="mid.qcow2",
                                        base="top.qcow2")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        base_node="nonexistent")),
        # base not below top: above it, or in another chain.
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        base_node="top")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        base_node="solo")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        base_node=mid)),
        await ex("block-commit", commit(device="top", job_id="x", top_node=base)),
        await ex("block-commit", commit(device="solo", job_id="x")),
        await ex("block-commit", commit(device="top", job_id="x", backing_file="b.qcow2")),
        await ex("block-commit", commit(device="top", job_id="x", top_node="top",
                                        backing_file="b.qcow2")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid, speed=-1)),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        on_error="sometimes")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid,
                                        filter_node_name="solo")),
        await ex("block-commit", commit(device="top", job_id="x", top_node=mid, bogus=1)),
    ])
    rec["errors-change-nothing"] = (await nodes()) == before

    # ---- commit mid into base while the guest writes into top -----------
    rec["commit"] = await ex("block-commit", commit(device="top", job_id="k1",
                                                    top_node=mid, speed=MiB))
    rec["while-running"] = named([
        # The job holds top, as QEMU's job children do.
        await ex("block-commit", commit(device="top", job_id="k2", top_node=mid)),
        await ex("block-stream", {"job-id": "k2", "device": "top"}),
        await ex("block-stream", {"job-id": "k2", "device": mid}),
        await ex("blockdev-del", {"node-name": "top"}),
        # Duplicate job id (another chain, which is free).
        await ex("block-commit", commit(device="ctop", job_id="k1", top="cmid.qcow2")),
        await ex("job-complete", {"id": "k1"}),
    ])
    running = job_shape((await ex("query-jobs"))["return"])
    # Right after the start ours may not have measured the device yet
    # (its job runs on its own I/O thread; QEMU's coroutine has measured
    # it before block-commit returns): 0 or the length.
    for j in running:
        j["total-progress"] = j["total-progress"] in (0, 32 * MiB)
    rec["query-jobs-running"] = running
    writes = ["write -P 0x77 5M 64k", "write -P 0x78 20M 1M", "write -P 0x79 10M 4k"]
    rec["guest-writes-during-commit"] = work.qemu_io(work.url("top"), "raw",
                                                     writes + ["flush"])
    rec["reference-writes"] = work.qemu_io(f"{W}/ref.raw", "raw", writes)
    rec["pause"] = await ex("job-pause", {"id": "k1"})
    await s.wait_status("k1", "paused")
    rec["query-jobs-paused"] = job_shape((await ex("query-jobs"))["return"])
    rec["query-block-jobs-paused"] = [
        {k: v for k, v in j.items() if k not in ("offset", "busy")}
        for j in (await ex("query-block-jobs"))["return"]]
    # base is read-write for the job, mid (still read by top) read-only.
    rec["nodes-during"] = await nodes()
    rec["resume"] = [await ex("job-resume", {"id": "k1"}),
                     await ex("block-job-set-speed", {"device": "k1", "speed": 0})]
    await s.wait_status("k1", "null")
    rec["commit-events"] = s.job_events("k1", paused_by_user=True)
    # mid is gone, base read-only again, top's header names base.
    rec["nodes-after"] = await nodes()
    rec["chain-after"] = await backing_depth("top")
    rec["chain-file-after"] = work.chain("top.qcow2", "-U")
    rec["jobs-after"] = await ex("query-jobs")
    rec["top-free-again"] = await ex("block-stream", {"job-id": "k3", "device": "top",
                                                      "base-node": base})
    await s.wait_status("k3", "null")

    # ---- a cancelled commit, top and base by file name ------------------
    rec["cancel-start"] = await ex("block-commit", commit(
        device="ctop", job_id="kc", top="cmid.qcow2", base="cbase.qcow2",
        speed=65536, auto_dismiss=False))
    # Cancel once the job has measured its work (see above).
    await s.poll("kc measured", "query-jobs", {},
                 lambda r: any(j["id"] == "kc" and j["total-progress"] > 0
                               for j in r.get("return", [])))
    rec["cancel"] = await ex("job-cancel", {"id": "kc"})
    await s.wait_status("kc", "concluded")
    rec["cancel-query"] = job_shape((await ex("query-jobs"))["return"])
    rec["dismiss"] = [await ex("job-dismiss", {"id": "kc"}),
                      await ex("job-dismiss", {"id": "kc"})]
    await s.wait_status("kc", "null")
    rec["cancel-events"] = s.job_events("kc")
    rec["cancel-chain-kept"] = await backing_depth("ctop")
    # Deleting top deletes the chain it opened: base, which it got from
    # the committed mid, goes with it.
    rec["delete-top"] = [await ex("block-export-del", {"id": "e-top"}),
                         await ex("blockdev-del", {"node-name": "top"})]
    rec["nodes-at-end"] = await nodes()

    # ---- the files, once the daemon is gone -----------------------------
    rec["quit"] = await ex("quit")
    await s.close()
    images = ["top", "base", "mid", "ctop", "cmid", "cbase"]
    rec["check"] = work.check_released(images)
    rec["chains"] = {i: work.chain(f"{i}.qcow2") for i in ("top", "ctop")}
    rec["compare"] = {
        # Every byte the guest saw, its writes during the commit included.
        "top-vs-reference": work.compare("top.qcow2", "ref.raw"),
        # base holds what mid showed: the commit copied it all.
        "base-vs-mid-before": work.compare("base.qcow2", "base-after.raw"),
        # A cancelled commit changes nothing the guest sees.
        "ctop-vs-reference": work.compare("ctop.qcow2", "cref.raw"),
    }
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
