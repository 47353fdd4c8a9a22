"""What the job scripts in tests/qmp share (commit.py uses all of it;
jobs.py, which predates it, its helpers and job_events): a qemu.qmp session that records
events, runs commands with a deadline and returns results or errors as
plain data, waits for events with a deadline, and takes a job's event
sequence apart the way both daemons can agree on; plus qemu-img/qemu-io
helpers that make paths relative to the work directory.

Every wait has a deadline (TIMEOUT); a missed one raises, which fails the
script and the test (which kills the daemon).
"""

import asyncio
import json
import subprocess
import time

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 30
MiB = 1 << 20


class Work:
    """The work directory W and the NBD socket: paths and tools."""

    def __init__(self, w, nbd):
        self.w, self.nbd = w, nbd

    def rel(self, path):
        if isinstance(path, str) and path.startswith(self.w + "/"):
            return path[len(self.w) + 1:]
        return path

    def url(self, export):
        return f"nbd+unix:///{export}?socket={self.nbd}"

    def chain(self, image, *opts):
        """qemu-img info --backing-chain: (file, backing, format, size)."""
        code, out = run("qemu-img", "info", *opts, "--backing-chain",
                        "--output=json", f"{self.w}/{image}")
        if code != 0:
            return [code, out]
        return [[self.rel(i.get("filename")), self.rel(i.get("full-backing-filename")),
                 i.get("backing-filename-format"), i.get("virtual-size")]
                for i in json.loads(out)]

    def qemu_io(self, target, fmt, cmds):
        args = []
        for c in cmds:
            args += ["-c", c]
        return run("qemu-io", "-f", fmt, target, *args)[0]

    def check_released(self, names):
        """`qemu-img check` rc of each `name`.qcow2, once the daemon has let
        go of them all (it answers `quit` before it has closed every image:
        wait until `qemu-img info` can open each, within TIMEOUT)."""
        deadline = time.monotonic() + TIMEOUT
        for i in names:
            while run("qemu-img", "info", f"{self.w}/{i}.qcow2")[0] != 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the daemon still holds {i}.qcow2")
                time.sleep(0.05)
        return {i: run("qemu-img", "check", f"{self.w}/{i}.qcow2")[0] for i in names}

    def compare(self, image, raw):
        return run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                   f"{self.w}/{image}", f"{self.w}/{raw}")[0]


def run(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout + p.stderr


class Session:
    """One QMP connection with its events."""

    def __init__(self, name):
        self.c = QMPClient(name)
        self.events = []
        self.collector = None

    async def connect(self, path):
        await asyncio.wait_for(self.c.connect(path), TIMEOUT)

        async def collect():
            async for ev in self.c.events:
                self.events.append((ev["event"], ev["data"]))
        self.collector = asyncio.create_task(collect())

    async def close(self):
        if self.collector:
            self.collector.cancel()
        try:
            await self.c.disconnect()
        except EOFError:
            pass  # the daemon closed the connection first

    async def ex(self, cmd, args=None):
        try:
            r = await asyncio.wait_for(self.c.execute(cmd, args or {}), TIMEOUT)
            return {"return": r}
        except ExecuteError as e:
            return {"error": e.error_class, "desc": str(e)}

    async def wait_for(self, what, pred):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for e in self.events:
                if pred(e):
                    return e
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {what} within {TIMEOUT}s; events: {self.events}")

    async def wait_status(self, job, status):
        await self.wait_for(f"{job} {status}", lambda e: (
            e[0] == "JOB_STATUS_CHANGE" and e[1]["id"] == job
            and e[1]["status"] == status))

    async def poll(self, what, cmd, args, pred):
        """Runs cmd until pred(result) holds, within the deadline."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            r = await self.ex(cmd, args)
            if pred(r):
                return r
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{what} not seen within {TIMEOUT}s")

    def job_events(self, job, paused_by_user=False):
        """job_events of this session's events."""
        return job_events(self.events, job, paused_by_user)


def job_events(events, job, paused_by_user=False):
    """The job's events in order, of `events` ((name, data) pairs):
    statuses (with paused/running pairs after the first `running` taken
    out: drains cause them whenever they like, QEMU's more often than
    ours) and the BLOCK_JOB_* events, `offset` as "len" or "below len"
    (timing); whether it was paused, for a job the user paused."""
    out, paused = [], False
    for name, data in events:
        if data.get("id") != job and data.get("device") != job:
            continue
        if name == "JOB_STATUS_CHANGE":
            s = data["status"]
            if s in ("paused", "running") and "running" in out:
                paused |= s == "paused"
                continue
            out.append(s)
        else:
            d = dict(data)
            if "offset" in d:
                d["offset"] = ("len" if d["offset"] == d["len"]
                               else "below len" if d["offset"] < d["len"]
                               else d["offset"])
            out.append({name: d})
    if paused_by_user:
        return {"sequence": out, "paused-on-the-way": paused}
    return {"sequence": out}


def job_shape(jobs):
    """query-jobs with the progress of a running job as its type (timing)."""
    return [{k: (v if k != "current-progress" else type(v).__name__)
             for k, v in j.items()} for j in jobs]


def ready_job_events(events, job, numbers):
    """The events of a job that goes READY (mirror, active commit), in
    order, as both daemons can agree on them: statuses without `standby`
    and repeated `ready` (QEMU's ready job flips to standby whenever it
    drains; ours does not) and without paused/running pairs after the
    first `running`; BLOCK_JOB_* events with their `offset`/`len` put in
    shape by `numbers(d)` (they depend on the guest's timing)."""
    out = []
    for name, data in events:
        if data.get("id") != job and data.get("device") != job:
            continue
        if name == "JOB_STATUS_CHANGE":
            st = data["status"]
            if st == "standby" or (st == "ready" and "ready" in out):
                continue
            if st in ("paused", "running") and "running" in out:
                continue
            out.append(st)
        else:
            d = dict(data)
            if "offset" in d:
                numbers(d)
            out.append({name: d})
    return out
