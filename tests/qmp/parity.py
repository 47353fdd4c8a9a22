#!/usr/bin/env python3
"""One QMP session, run unchanged against blockgraph's storage_daemon and
against qemu-storage-daemon; prints what it observed as one JSON document.

tests/storage_daemon.rs starts each daemon with the same command line
(file node f0 and qcow2 node d0 on WORKDIR/disk.qcow2, a monitor on
QMP_SOCKET), runs this script against each and compares the two documents.
Only what both daemons must agree on is recorded: results, error classes
(not their wording), the node list's fields, what qemu-img, qemu-io and
nbdinfo see through the export, and events. Version strings are not.

Usage: parity.py QMP_SOCKET WORKDIR NBD_SOCKET

Drives the daemon with QEMU's own QMP client library, qemu.qmp (PyPI), and
ends it with `quit` over a raw socket (after checking the raw protocol:
negotiation mode, malformed input, id echo).
"""

import asyncio
import json
import os
import socket
import subprocess
import sys

from qemu.qmp import ExecuteError, QMPClient

QMP, WORKDIR, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
TIMEOUT = 20


def rel(path):
    """A path relative to WORKDIR, so both runs compare equal. A "json:"
    filename (QEMU's for nodes a plain name cannot describe) is compared as
    the object it holds, whatever the order of its members."""
    if isinstance(path, str) and path.startswith("json:"):
        def walk(v):
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return rel(v)
        return "json:" + json.dumps(walk(json.loads(path[5:])), sort_keys=True)
    if isinstance(path, str) and path.startswith(WORKDIR + "/"):
        return path[len(WORKDIR) + 1:]
    return path


def nodes(lst):
    """The node list's fields both daemons fill, sorted; automatic node
    names (QEMU's #blockNNN) are not compared, only that they are one."""
    out = []
    for n in lst:
        img = n.get("image", {})
        out.append({
            "node-name": "#auto" if n["node-name"].startswith("#") else n["node-name"],
            "drv": n["drv"],
            "ro": n["ro"],
            "file": rel(n["file"]),
            "backing_file_depth": n["backing_file_depth"],
            "virtual-size": img.get("virtual-size"),
            "format": img.get("format"),
            "filename": rel(img.get("filename")),
            "cluster-size": img.get("cluster-size"),
            "backing-filename": img.get("backing-filename"),
            "backing-image-format": img.get("backing-image", {}).get("format"),
        })
    return sorted(out, key=lambda x: json.dumps(x, sort_keys=True))


def run(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout


async def main():
    rec = {}
    c = QMPClient("parity")
    await asyncio.wait_for(c.connect(QMP), TIMEOUT)

    async def ex(cmd, args=None):
        try:
            r = await asyncio.wait_for(c.execute(cmd, args or {}), TIMEOUT)
            return {"return": r}
        except ExecuteError as e:
            return {"error": e.error_class}

    async def event(name):
        async def wait():
            async for ev in c.events:
                if ev["event"] == name:
                    return {"event": name, "data": ev["data"],
                            "timestamp": sorted(ev["timestamp"].keys())}
        return await asyncio.wait_for(wait(), TIMEOUT)

    async def query(flat=True):
        return (await ex("query-named-block-nodes", {"flat": flat}))["return"]

    greeting = c.greeting._asdict()["QMP"]
    ver = greeting["version"]["qemu"]
    rec["greeting"] = {
        "keys": sorted(greeting.keys()),
        "version-fields": sorted(ver.keys()),
        "version-ints": all(isinstance(v, int) for v in ver.values()),
    }
    have = {x["name"] for x in (await ex("query-commands"))["return"]}
    rec["commands"] = {n: n in have for n in [
        "qmp_capabilities", "quit", "query-version", "query-commands",
        "blockdev-add", "blockdev-del", "query-named-block-nodes",
        "object-add", "object-del", "nbd-server-start", "nbd-server-stop",
        "block-export-add", "block-export-del", "query-block-exports"]}
    rec["initial-nodes"] = nodes(await query())

    # Nodes of every driver, QEMU's JSON shapes.
    w = WORKDIR
    rec["add"] = [
        await ex("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        await ex("blockdev-add", {"driver": "raw", "node-name": "r0",
                                  "file": {"driver": "file", "filename": f"{w}/raw.img"}}),
        await ex("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                "limits": {"iops-total": 10000}}),
        await ex("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                  "throttle-group": "tg0", "file": "r0"}),
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                  "file": {"driver": "file", "filename": f"{w}/top.qcow2"}}),
        await ex("blockdev-add", {"driver": "copy-on-read", "node-name": "cor0", "file": "top"}),
        await ex("blockdev-add", {"driver": "file", "node-name": "rof",
                                  "filename": f"{w}/raw.img", "read-only": True,
                                  "force-share": True}),
        await ex("blockdev-add", {"driver": "raw", "node-name": "ror", "file": "rof",
                                  "read-only": True}),
    ]
    rec["add-errors"] = [
        await ex("blockdev-add", {"driver": "file", "node-name": "f0", "filename": f"{w}/raw.img"}),
        await ex("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "nonexistent"}),
        await ex("blockdev-add", {"driver": "no-such-driver", "node-name": "x"}),
        await ex("blockdev-add", {"driver": "null-co", "node-name": "x", "bogus": 1}),
        await ex("blockdev-add", {"driver": "file", "node-name": "x"}),
        await ex("blockdev-add", {"driver": "file", "node-name": "x", "filename": f"{w}/missing.img"}),
        await ex("blockdev-add", {"driver": "throttle", "node-name": "x",
                                  "throttle-group": "nogroup", "file": "n0"}),
        await ex("blockdev-add", {"driver": "null-co"}),
        await ex("blockdev-add", {"driver": "null-co", "node-name": "1bad"}),
        await ex("blockdev-add", {"driver": "null-co", "node-name": "x", "size": "big"}),
        await ex("object-add", {"qom-type": "throttle-group", "id": "tg0"}),
    ]
    rec["nodes-after-add"] = nodes(await query())
    deep = {n["node-name"]: n for n in await query(flat=False)}
    rec["deep-top"] = [deep["top"]["backing_file_depth"],
                       deep["top"]["image"].get("backing-image", {}).get("format")]
    auto = [n["node-name"] for n in await query()
            if n["node-name"].startswith("#") and n["drv"] == "qcow2"]

    rec["del-errors"] = [
        await ex("blockdev-del", {"node-name": "nonexistent"}),
        await ex("blockdev-del", {"node-name": "r0"}),
        await ex("blockdev-del", {"node-name": auto[0] if auto else "#none"}),
        await ex("blockdev-del", {}),
        await ex("object-del", {"id": "tg0"}),
    ]
    rec["del"] = [await ex("blockdev-del", {"node-name": n})
                  for n in ["cor0", "top", "t0", "r0", "n0", "ror", "rof"]]
    rec["object-del"] = [await ex("object-del", {"id": "tg0"}),
                         await ex("object-del", {"id": "tg0"})]
    rec["nodes-after-del"] = nodes(await query())

    # NBD: the server, exports, and real clients through them.
    url = f"nbd+unix:///disk?socket={NBD}"
    rec["nbd-before-start"] = [
        await ex("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}),
        await ex("nbd-server-stop"),
    ]
    rec["nbd-start"] = [
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD + "2"}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0",
                                      "name": "disk", "writable": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}),
        await ex("block-export-add", {"type": "nbd", "id": "e9", "node-name": "f0",
                                      "name": "disk"}),
        await ex("block-export-add", {"type": "nbd", "id": "e9", "node-name": "nonexistent"}),
        await ex("block-export-add", {"type": "no-such-type", "id": "e9", "node-name": "d0"}),
        await ex("blockdev-del", {"node-name": "d0"}),
    ]
    exports = (await ex("query-block-exports"))["return"]
    rec["exports"] = sorted([(e["id"], e["node-name"], e["type"]) for e in exports])
    code, out = run("qemu-img", "info", "--output=json", url)
    info = json.loads(out) if code == 0 else {}
    rec["qemu-img-info"] = [code, info.get("virtual-size"), info.get("format")]
    rec["qemu-io"] = run("qemu-io", "-f", "raw", url,
                         "-c", "write -P 0x5a 64k 64k", "-c", "flush",
                         "-c", "read -P 0x5a 64k 64k", "-c", "read -P 0 0 64k")[0]
    code, out = run("nbdinfo", "--json", url)
    ex0 = json.loads(out)["exports"][0] if code == 0 else {}
    rec["nbdinfo"] = [code, ex0.get("export-name"), ex0.get("export-size"),
                      ex0.get("is_read_only")]
    rec["export-del"] = [
        await ex("block-export-del", {"id": "e0"}),
        await event("BLOCK_EXPORT_DELETED"),
        await ex("block-export-del", {"id": "e0"}),
    ]
    rec["nbd-stop"] = [
        await ex("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0"}),
        await ex("nbd-server-stop"),
        await event("BLOCK_EXPORT_DELETED"),
        await ex("query-block-exports"),
    ]
    await c.disconnect()

    # The raw protocol: negotiation mode, malformed input, id echo, quit.
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(QMP)
    f = s.makefile("rb")

    def send(text):
        s.sendall(text.encode() + b"\n")

    def recv():
        return json.loads(f.readline())

    def cls(msg):
        return msg["error"]["class"] if "error" in msg else "return"

    def sync(tag):
        """Sends a tagged command and reads until its reply: QEMU's lexer
        may answer one bad input with several errors."""
        send(json.dumps({"execute": "query-version", "id": tag}))
        first = None
        while True:
            m = recv()
            if first is None:
                first = m
            if m.get("id") == tag:
                return cls(first) if first is not m else None

    raw = {}
    raw["greeting"] = sorted(recv()["QMP"].keys())
    send('{"execute": "query-version", "id": 1}')
    m = recv()
    raw["before-negotiation"] = [cls(m), m.get("id")]
    send("[]")
    raw["array"] = sync("s1")
    send('{"execute": "qmp_capabilities", "id": "cap"}')
    raw["negotiate"] = cls(recv())
    send('{"execute": "qmp_capabilities"}')
    raw["negotiate-again"] = cls(recv())
    send("not json at all")
    raw["garbage"] = sync("s2")
    send('{"id": 5}')
    m = recv()
    raw["no-execute"] = [cls(m), m.get("id")]
    send('{"execute": "query-version", "arguments": []}')
    raw["arguments-not-object"] = cls(recv())
    send('{"execute": "query-version", "bogus": 1}')
    raw["unexpected-member"] = cls(recv())
    send('{"execute": "no-such-command"}')
    raw["unknown-command"] = cls(recv())
    send('{"execute": "query-version", "id": {"a": [1, "x"]}}')
    m = recv()
    raw["id-echo"] = m.get("id") == {"a": [1, "x"]} and "return" in m
    send('{"execute":\n "query-version",\n "id": "split"}')
    raw["multi-line"] = recv().get("id")
    send('{"execute": "quit", "id": "q"}')
    m = recv()
    raw["quit"] = [cls(m), m.get("id")]
    try:
        rest = f.read()
    except ConnectionResetError:
        rest = b""
    raw["closed-after-quit"] = all(
        "event" in json.loads(line) for line in rest.splitlines() if line.strip())
    rec["raw"] = raw
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
