"""Test harness: the real ``corebus`` binary on real ports with a real data directory.

Every wait polls a condition with a deadline; nothing sleeps and hopes.

Environment:
    COREBUS_BIN       the broker binary (default: target/release/corebus of this repository)
    COREBUS_TEST_DIR  where data directories go (default: target/python-tests); it must be on a
                      real filesystem (ext4, xfs), not tmpfs: the broker uses O_DIRECT.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from corebus_client import Client

REPO = Path(__file__).resolve().parents[3]
START_DEADLINE_S = 20.0
_names = itertools.count()


def broker_binary() -> Path:
    path = Path(os.environ.get("COREBUS_BIN", "target/release/corebus"))
    return path if path.is_absolute() else REPO / path


def wait_until(what: str, deadline_s: float, cond: Callable[[], bool]) -> None:
    """Polls ``cond`` every 10 ms until it holds; fails the test after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port_span(span: int) -> int:
    """A port ``p`` such that ``p..=p+span`` can all be bound now, taken from below the
    kernel's ephemeral range (as tests/common/mod.rs does), so that no client connection
    can ever be bound to the broker's ports."""
    seed = time.time_ns() % 1_000_000_007 + os.getpid() * 7919
    for attempt in range(500):
        p = 20_000 + (seed + attempt * 104_729) % 12_000
        socks = []
        try:
            for i in range(span + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port span found")


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mountinfo)."""
    path = path.resolve()
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount_point = left.split()[4]
                if (path == Path(mount_point) or Path(mount_point) in path.parents) and len(
                    mount_point
                ) >= len(best):
                    best, fstype = mount_point, right.split()[0]
    except OSError:
        pass
    return fstype


class Broker:
    """A running ``corebus serve`` with ``shards`` shards on a fresh data directory."""

    def __init__(self, root: Path, shards: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.shards = shards
        self.extra = extra
        self.dir = root / f"broker-{os.getpid()}-{next(_names)}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.log = self.dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        for _ in range(5):  # another process may take the ports between the check and bind
            self.port = free_port_span(shards + 1)
            if self._launch():
                return
        raise RuntimeError(f"broker did not start:\n{self.log_text()}")

    def _launch(self) -> bool:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(broker_binary()), "serve", "--data-dir", str(self.dir / "data"),
                 "--listen", f"127.0.0.1:{self.port}", "--shards", str(self.shards),
                 "--io-memory", "16MiB", *self.extra],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        end = time.monotonic() + START_DEADLINE_S
        ports = [self.port] + [self.shard_port(i) for i in range(self.shards)]
        waiting = list(ports)
        while waiting:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"broker did not become ready:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.01)
        return True

    def shard_port(self, i: int) -> int:
        """Shard ``i``'s own port."""
        return self.port + 1 + i

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the broker (SIGTERM, then SIGKILL after a deadline)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def start_broker(*extra: str) -> Iterator[Broker]:
    """Starts a broker with 2 shards and the extra ``corebus serve`` arguments ``extra``,
    yields it, then stops it and removes its data directory (for fixtures)."""
    binary = broker_binary()
    if not binary.is_file():
        pytest.fail(f"no broker binary at {binary}: build it (cargo build --release) or set "
                    "COREBUS_BIN")
    root = Path(os.environ.get("COREBUS_TEST_DIR", REPO / "target" / "python-tests"))
    root.mkdir(parents=True, exist_ok=True)
    fstype = _filesystem_type(root)
    if fstype in ("tmpfs", "ramfs"):
        pytest.fail(f"{root} is on {fstype}; the broker needs O_DIRECT: set COREBUS_TEST_DIR "
                    "to a directory on ext4 or xfs")
    b = Broker(root, extra=extra)
    try:
        yield b
    finally:
        b.stop()
        if not os.environ.get("COREBUS_KEEP_TEST_DIR"):
            shutil.rmtree(b.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One broker with 2 shards for the whole session; tests use their own topics."""
    yield from start_broker()


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    """A shard-aware client bootstrapped from the public port."""
    with Client("127.0.0.1", broker.port, timeout=10.0) as c:
        yield c


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name of this test's own."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:150]
    return f"{base}-{next(_names)}"
