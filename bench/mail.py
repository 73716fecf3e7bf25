"""The local Graph server and `syncctl` processes, as the mail benchmarks use them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from syncctl.fakegraph import FakeGraphServer

# One seed for every run, so every run serves the same mailboxes.
SEED = 5


class CachedGraphServer(FakeGraphServer):
    """The local Graph server, keeping each message once generated and serialised.

    Generating a message, and turning it into JSON, costs the server more than
    syncctl spends storing it, on the same two cores. Warmed before timing,
    the server only joins the JSON of the messages a page asks for, so the
    figures measure syncctl (and the baselines), not the server. Real Graph
    does its share of the work on Microsoft's machines.
    """

    def __init__(self, mailboxes: dict[str, int], **knobs: Any) -> None:
        super().__init__(mailboxes, seed=SEED, **knobs)
        self._generated: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._serialised: dict[tuple[Any, ...], bytes] = {}

    def _message(self, mailbox: Any, index: int) -> dict[str, Any]:
        key = _version(mailbox, index)
        message = self._generated.get(key)
        if message is None:
            message = self._generated[key] = super()._message(mailbox, index)
        return message

    def _message_json(self, mailbox: Any, index: int, select: list[str] | None) -> bytes:
        key = (*_version(mailbox, index), None if select is None else tuple(select))
        data = self._serialised.get(key)
        if data is None:
            data = self._serialised[key] = super()._message_json(mailbox, index, select)
        return data

    def warm(
        self, email: str, count: int | None = None, *, select: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Generate (once) and return the mailbox's first `count` messages, oldest
        first; with `select`, also keep their JSON as a page with that $select has it."""
        size = self.mailbox_size(email) if count is None else count
        messages = [self.message(email, index) for index in range(size)]
        if select is not None:
            mailbox = self._mailboxes[email.strip().lower()]
            for index in range(size):
                self._message_json(mailbox, index, select)
        return messages


def _version(mailbox: Any, index: int) -> tuple[Any, ...]:
    """A message as it is now: an edit or a move makes it another one to keep."""
    return (mailbox.name, index, mailbox.edits.get(index, 0), mailbox.folder_of(index))


def syncctl_env(database_url: str, server: FakeGraphServer) -> dict[str, str]:
    """The environment of a `syncctl` process pointed at the database and the local server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCCTL_")}
    env.pop("DATABASE_URL", None)
    env.update(
        SYNCCTL_DATABASE_URL=database_url,
        SYNCCTL_GRAPH_URL=server.url,
        SYNCCTL_GRAPH_TOKEN=server.token,
    )
    return env


def syncctl(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    """Run one `syncctl` command to its end; its stdout."""
    result = subprocess.run(  # noqa: S603 - the installed syncctl, fixed arguments
        [sys.executable, "-m", "syncctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"syncctl {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result.stdout


@dataclass(frozen=True)
class WorkerRun:
    seconds: float  # wall time of the process, start to exit
    peak_rss_mib: float  # the process's peak resident memory (VmHWM, sampled)


# How often a worker's peak memory is read while it runs (VmHWM only grows).
MEMORY_SAMPLE_INTERVAL = 0.02


class WorkerProcess:
    """A `syncctl run` process, its log kept in a file (a full pipe would stall it)."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in wait()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(  # noqa: S603 - the installed syncctl, fixed arguments
            [sys.executable, "-m", "syncctl", "run", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait(self) -> WorkerRun:
        """Wait for the exit; the wall time and the peak memory the kernel recorded."""
        peak_kib = 0
        try:
            while True:
                # VmHWM is this process's own peak since exec (ru_maxrss would
                # also count the forked copy of this large benchmark process).
                peak_kib = max(peak_kib, _peak_rss_kib(self.process.pid))
                try:
                    self.process.wait(timeout=MEMORY_SAMPLE_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    continue
            seconds = time.perf_counter() - self.started
            if self.process.returncode != 0:
                self._log.seek(0)
                errors = self._log.read().decode("utf-8", "replace")
                raise RuntimeError(
                    f"syncctl run exited {self.process.returncode}:\n{errors[-4000:]}"
                )
        finally:
            self._log.close()
        return WorkerRun(seconds, peak_kib / 1024)


def _peak_rss_kib(pid: int) -> int:
    """VmHWM of a running process, in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_worker(*args: str, env: dict[str, str]) -> WorkerRun:
    """Run one `syncctl run` process to its end."""
    return WorkerProcess(*args, env=env).wait()
