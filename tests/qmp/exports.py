#!/usr/bin/env python3
"""block-export-del's modes over QMP: one session, run unchanged against
blockgraph's storage_daemon and qemu-storage-daemon; prints what it
observed as one JSON document (tests/storage_daemon.rs compares them).

Two exports (d0 as "disk", writable; a null-co node n1 as "other"), a raw
NBD client on each (they pick their export with NBD_OPT_GO). `safe` (the
default) is refused while a client is connected, in QEMU's words; a write
answered before a `hard` deletion is not lost; `hard` disconnects that
export's client only, and BLOCK_EXPORT_DELETED follows. Then a client
with 1 MiB reads in flight whose replies it does not read: after `hard`
the export is `shutting-down` (another deletion is refused, its id stays
taken, its NBD name is free again, its node is in use) until the client
reads, sees the end of the connection, and the event arrives.

Usage: exports.py QMP_SOCKET WORKDIR NBD_SOCKET
"""

import asyncio
import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import MiB, TIMEOUT, Session, Work, run  # noqa: E402

QMP, W, NBD = sys.argv[1], sys.argv[2], sys.argv[3]
work = Work(W, NBD)

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE = 0, 1


class Nbd:
    """A raw NBD client (fixed newstyle, NBD_OPT_GO, simple replies)."""

    def __init__(self, export):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(TIMEOUT)
        self.s.connect(NBD)
        self.exact(18)  # greeting
        self.s.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
        while True:
            _, _, kind, n = struct.unpack(">QIII", self.exact(20))
            self.exact(n)
            if kind == 1:  # ACK
                break
            if kind & 0x80000000:
                raise RuntimeError(f"GO {export} refused: {kind:#x}")

    def exact(self, n):
        b = b""
        while len(b) < n:
            x = self.s.recv(n - len(b))
            if not x:
                raise EOFError
            b += x
        return b

    def send(self, kind, cookie, offset, length, payload=b""):
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, cookie,
                                   offset, length) + payload)

    def reply(self, read_len=0):
        """(error, cookie, data) of one simple reply, or "eof"."""
        try:
            magic, error, cookie = struct.unpack(">IIQ", self.exact(16))
        except (EOFError, ConnectionResetError):
            return "eof"
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        if not read_len:
            return [error, cookie]
        data = self.exact(read_len) if error == 0 else b""
        return [error, cookie, data == b"\0" * read_len]

    def drain_to_eof(self):
        """Reads until the server closes; whether it did."""
        try:
            while self.s.recv(1 << 20):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def exports(r):
    return sorted([[e["id"], e["node-name"], e["shutting-down"]] for e in r["return"]])


async def main():
    rec = {}
    s = Session("exports")
    await s.connect(QMP)

    async def ex(cmd, args=None):
        r = await s.ex(cmd, args)
        return r if "error" not in r else {"error": r["error"], "desc": r["desc"]}

    def deleted(eid):
        return lambda e: e[0] == "BLOCK_EXPORT_DELETED" and e[1]["id"] == eid

    rec["setup"] = [
        await ex("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
        await ex("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0",
                                      "name": "disk", "writable": True}),
        await ex("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": MiB,
                                  "read-zeroes": True}),
        await ex("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n1",
                                      "name": "other"}),
    ]
    c0, c1 = Nbd("disk"), Nbd("other")
    rec["in-use"] = exports(await ex("query-block-exports"))
    rec["safe-refused"] = [
        await ex("block-export-del", {"id": "e0"}),
        await ex("block-export-del", {"id": "e0", "mode": "safe"}),
        await ex("block-export-del", {"id": "e0", "mode": "bogus"}),
        await ex("block-export-del", {"id": "nope", "mode": "hard"}),
    ]
    # A write answered before the deletion is not lost.
    c0.send(CMD_WRITE, 1, MiB, 64 << 10, b"\x5a" * (64 << 10))
    rec["write"] = c0.reply()
    rec["hard"] = await ex("block-export-del", {"id": "e0", "mode": "hard"})
    await s.wait_for("e0 deleted", deleted("e0"))
    rec["c0-after"] = c0.reply()
    c1.send(CMD_READ, 2, 0, 512)
    rec["c1-after"] = c1.reply(512)
    rec["after-hard"] = exports(await ex("query-block-exports"))
    rec["re-add"] = await ex("block-export-add", {"type": "nbd", "id": "e0",
                                                  "node-name": "d0", "name": "disk"})
    rec["write-kept"] = run("qemu-io", "-r", "-f", "raw", work.url("disk"),
                            "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 64k")[0]

    # Replies in flight that the client does not read: shutting down.
    c2 = Nbd("other")
    for cookie in range(10):
        c2.send(CMD_READ, cookie, 0, MiB)
    time.sleep(0.3)
    rec["hard-busy"] = await ex("block-export-del", {"id": "e1", "mode": "hard"})
    rec["shutting-down"] = [
        exports(await ex("query-block-exports")),
        await ex("block-export-del", {"id": "e1", "mode": "hard"}),
        await ex("block-export-del", {"id": "e1"}),
        await ex("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n1",
                                      "name": "again"}),
        await ex("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n1",
                                      "name": "other"}),
        await ex("blockdev-del", {"node-name": "n1"}),
    ]
    rec["no-event-yet"] = [e for e in s.events if deleted("e1")(e)]
    rec["c2-eof"] = c2.drain_to_eof()
    await s.wait_for("e1 deleted", deleted("e1"))
    c1.s.settimeout(TIMEOUT)
    rec["c1-eof"] = c1.reply()
    rec["after-busy"] = exports(await ex("query-block-exports"))
    # The new export of the same name serves a new client.
    c3 = Nbd("other")
    c3.send(CMD_READ, 3, 0, 512)
    rec["c3"] = c3.reply(512)[:2]
    rec["last"] = [
        await ex("block-export-del", {"id": "e2", "mode": "hard"}),
        await s.wait_for("e2 deleted", deleted("e2")) is not None,
        c3.reply(),
        await ex("block-export-del", {"id": "e0"}),
        await s.wait_for("e0 deleted again", lambda e: (
            deleted("e0")(e) and len([x for x in s.events if deleted("e0")(x)]) == 2))
        is not None,
        exports(await ex("query-block-exports")),
        await ex("blockdev-del", {"node-name": "n1"}),
    ]
    rec["events"] = sorted(d["id"] for n, d in s.events if n == "BLOCK_EXPORT_DELETED")
    rec["quit"] = await ex("quit")
    await s.close()
    print(json.dumps(rec, indent=1, sort_keys=True))


asyncio.run(main())
