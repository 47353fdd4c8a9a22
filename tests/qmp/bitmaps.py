#!/usr/bin/env python3
"""Dirty bitmaps over QMP: run unchanged against blockgraph's
storage_daemon and against qemu-storage-daemon, twice per daemon on the
same files (PHASE "first", then "second" after the daemon exited), so
that persistent bitmaps are seen surviving a restart; prints what it
observed as one JSON document.

tests/storage_daemon.rs prepares WORKDIR (see `bitmap_images` there:
bm.qcow2, a qcow2 image; r.raw, a raw file of the same size; s.raw, a
smaller one; inc.qcow2, whose persistent bitmap bx is flagged in use, as
a crashed writer leaves it), starts each daemon with the
same command line (d0 on disk.qcow2, a monitor on QMP_SOCKET) and compares
the documents.

First phase: block-dirty-bitmap-add and its errors (QEMU's words), guest
writes through the NBD export (qemu-io), what `dirty-bitmaps` of
query-named-block-nodes says after each of disable, enable, clear, merge
(also across nodes and granularities), remove and their errors; after
exit, the bitmaps qemu-img info sees in the image and qemu-img check.
Second phase: the image opened again: the persistent bitmaps are back
with their bits and modes, they go on recording, and what changes now
is in the image once blockdev-del has closed it (the daemon still
running).

Normalised: a very long name in one error (recorded by length); the
order of bitmaps the image stores and hence of those loaded from it
(second phase, qemu-img info: sorted by name), as each daemon writes the
image's bitmap directory in its own order. Otherwise QEMU lists a node's
bitmaps newest first, and so do we.

Not asked: block-dirty-bitmap-merge with an empty list, which makes
qemu-storage-daemon 10.0.2 crash (ours merges nothing); a list element
that is neither a name nor an object, for which QEMU names the member
'null' (ours says 'bitmaps[0]').

Usage: bitmaps.py QMP_SOCKET WORKDIR NBD_SOCKET PHASE
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import Session, Work, run  # noqa: E402

QMP, W, NBD, PHASE = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
work = Work(W, NBD)
ADD = "block-dirty-bitmap-add"


async def main():
    rec = {}
    s = Session("bitmaps")
    await s.connect(QMP)
    ex = s.ex

    async def bitmaps():
        """Every node's dirty-bitmaps (QEMU omits the member when a node
        has none), by node name; implicit file nodes never have any."""
        out = {}
        for n in (await ex("query-named-block-nodes", {"flat": True}))["return"]:
            if "dirty-bitmaps" in n:
                out[n["node-name"]] = n["dirty-bitmaps"]
                if PHASE == "second":
                    # Loaded in the image's directory order (see above).
                    out[n["node-name"]].sort(key=lambda b: b["name"])
        return out

    def guest(*cmds):
        return work.qemu_io(work.url("bm"), "raw", list(cmds) + ["flush"])

    def image_bitmaps(image="bm"):
        code, out = run("qemu-img", "info", "--output=json", f"{W}/{image}.qcow2")
        if code != 0:
            return [code, out]
        data = json.loads(out).get("format-specific", {}).get("data", {})
        # The directory's order is each daemon's own (see above).
        return sorted(data.get("bitmaps") or [], key=lambda b: b["name"])

    rec["setup"] = [
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "bm",
                                  "file": {"driver": "file",
                                           "filename": f"{W}/bm.qcow2"}}),
        await ex("blockdev-add", {"driver": "raw", "node-name": "r",
                                  "file": {"driver": "file", "filename": f"{W}/r.raw"}}),
        await ex("blockdev-add", {"driver": "raw", "node-name": "s",
                                  "file": {"driver": "file", "filename": f"{W}/s.raw"}}),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e", "node-name": "bm",
                                      "name": "bm", "writable": True}),
    ]
    rec["at-open"] = await bitmaps()

    if PHASE == "first":
        long_name = await ex(ADD, {"node": "bm", "name": "x" * 1024})
        rec["add-errors"] = [
            await ex(ADD, {}),
            await ex(ADD, {"node": "bm"}),
            await ex(ADD, {"node": "nonexistent", "name": "b"}),
            await ex(ADD, {"node": "bm", "name": ""}),
            await ex(ADD, {"node": "bm", "name": "b", "granularity": 1000}),
            await ex(ADD, {"node": "bm", "name": "b", "granularity": 256}),
            await ex(ADD, {"node": "bm", "name": "b", "granularity": 1 << 32}),
            await ex(ADD, {"node": "bm", "name": "b", "granularity": -1}),
            await ex(ADD, {"node": "bm", "name": "b", "granularity": "64k"}),
            await ex(ADD, {"node": "bm", "name": "b", "persistent": "yes"}),
            await ex(ADD, {"node": "r", "name": "b", "persistent": True}),
            await ex(ADD, {"node": "bm", "name": "b", "bogus": 1}),
            # The description repeats the 1024-byte name: its length.
            {k: (v if k != "desc" else [v[:22], len(v)]) for k, v in long_name.items()},
        ]
        rec["add"] = [
            await ex(ADD, {"node": "bm", "name": "b0"}),
            await ex(ADD, {"node": "bm", "name": "b1", "granularity": 131072,
                           "persistent": True}),
            await ex(ADD, {"node": "bm", "name": "b2", "persistent": True,
                           "disabled": True}),
            await ex(ADD, {"node": "bm", "name": "gone", "persistent": True}),
            await ex(ADD, {"node": "r", "name": "x", "granularity": 512}),
            await ex(ADD, {"node": "s", "name": "y"}),
            await ex(ADD, {"node": "bm", "name": "b0"}),
        ]
        rec["added"] = await bitmaps()
        rec["guest-1"] = guest("write 100k 8k", "write 1M 1M")
        rec["after-writes"] = await bitmaps()
        rec["disable"] = [await ex("block-dirty-bitmap-disable", {"node": "bm", "name": "b0"}),
                          await ex("block-dirty-bitmap-disable", {"node": "bm", "name": "b0"})]
        rec["guest-2"] = guest("write 4M 64k")
        rec["enable"] = [await ex("block-dirty-bitmap-enable", {"node": "bm", "name": "b0"}),
                         await ex("block-dirty-bitmap-enable", {"node": "bm", "name": "b0"})]
        rec["after-disable-write-enable"] = await bitmaps()
        rec["clear"] = await ex("block-dirty-bitmap-clear", {"node": "bm", "name": "b0"})
        rec["after-clear"] = await bitmaps()
        rec["verb-errors"] = [
            await ex(verb, args)
            for verb in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                         "block-dirty-bitmap-disable", "block-dirty-bitmap-remove")
            for args in ({"node": "bm"}, {"node": "nonexistent", "name": "b0"},
                         {"node": "bm", "name": "nonexistent"},
                         {"node": "r", "name": "b0"})
        ]
        rec["merge-errors"] = [
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0"}),
            await ex("block-dirty-bitmap-merge", {"node": "nonexistent", "target": "b0",
                                                  "bitmaps": ["b1"]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "nonexistent",
                                                  "bitmaps": ["b1"]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": ["b1", "nonexistent"]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": [{"node": "nonexistent",
                                                               "name": "x"}]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": [{"node": "r",
                                                               "name": "nonexistent"}]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": [{"node": "r"}]}),
            # s is smaller than bm.
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": ["b1", {"node": "s",
                                                                     "name": "y"}]}),
        ]
        rec["refused-merges-change-nothing"] = (await bitmaps()) == rec["after-clear"]
        # b0 gets b1 (another granularity: 128 KiB granules dirty two of
        # 64 KiB each) and r's x (another node, 512-byte granules, empty:
        # nothing writes r); b2 (disabled) gets b0; r's x gets b1.
        rec["merge"] = [
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b0",
                                                  "bitmaps": ["b1", {"node": "r",
                                                                     "name": "x"}]}),
            await ex("block-dirty-bitmap-merge", {"node": "bm", "target": "b2",
                                                  "bitmaps": ["b0"]}),
            await ex("block-dirty-bitmap-merge", {"node": "r", "target": "x",
                                                  "bitmaps": [{"node": "bm",
                                                               "name": "b1"}]}),
        ]
        rec["after-merge"] = await bitmaps()
        rec["remove"] = [await ex("block-dirty-bitmap-remove", {"node": "bm", "name": "gone"}),
                         await ex("block-dirty-bitmap-remove", {"node": "bm", "name": "gone"}),
                         await ex("block-dirty-bitmap-remove", {"node": "r", "name": "x"})]
        rec["at-end"] = await bitmaps()

        # An inconsistent bitmap: listed as such, refused by every verb
        # but remove, and as a merge source.
        rec["inconsistent"] = [
            await ex("blockdev-add", {"driver": "qcow2", "node-name": "inc",
                                      "file": {"driver": "file",
                                               "filename": f"{W}/inc.qcow2"}}),
            (await bitmaps()).get("inc"),
            await ex("block-dirty-bitmap-clear", {"node": "inc", "name": "bx"}),
            await ex("block-dirty-bitmap-enable", {"node": "inc", "name": "bx"}),
            await ex("block-dirty-bitmap-disable", {"node": "inc", "name": "bx"}),
            await ex(ADD, {"node": "inc", "name": "ok", "persistent": True}),
            await ex("block-dirty-bitmap-merge", {"node": "inc", "target": "ok",
                                                  "bitmaps": ["bx"]}),
            await ex("block-dirty-bitmap-merge", {"node": "inc", "target": "bx",
                                                  "bitmaps": ["ok"]}),
            await ex("block-dirty-bitmap-remove", {"node": "inc", "name": "bx"}),
            (await bitmaps()).get("inc"),
            await ex("blockdev-del", {"node-name": "inc"}),
        ]
        # bx left the image (QEMU removes it at once, we when closing),
        # ok is stored.
        rec["inc-image-bitmaps"] = image_bitmaps("inc")
    else:
        # b1 (recording) and b2 (disabled) are back with their bits; b0
        # and r's x were not persistent, `gone` was removed.
        rec["guest-3"] = guest("write 8M 64k")
        rec["after-writes"] = await bitmaps()
        rec["disable-b1"] = await ex("block-dirty-bitmap-disable", {"node": "bm",
                                                                    "name": "b1"})
        rec["clear-b2"] = await ex("block-dirty-bitmap-clear", {"node": "bm", "name": "b2"})
        rec["at-end"] = await bitmaps()
        # blockdev-del closes the image: its bitmaps are stored then, not
        # only at exit (b1 no longer `auto`: it was disabled).
        rec["delete"] = [await ex("block-export-del", {"id": "e"}),
                         await ex("blockdev-del", {"node-name": "bm"})]
        rec["image-bitmaps-after-delete"] = image_bitmaps()

    rec["quit"] = await ex("quit")
    await s.close()
    await asyncio.sleep(0)
    # Both daemons exit after quit; the test waits for that before the
    # next phase. The image is free once the daemon has closed it.
    for _ in range(600):
        if run("qemu-img", "info", f"{W}/bm.qcow2")[0] == 0:
            break
        await asyncio.sleep(0.05)
    rec["image-bitmaps"] = image_bitmaps()
    rec["check"] = run("qemu-img", "check", f"{W}/bm.qcow2")[0]
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
