"""Helpers of the cluster tests: `splitvlm` subprocesses, and processes by session id.

A Ray cluster started from a new session (its head, raylet, GCS, agents and workers) can be found
and ended by that session id without touching anyone else's Ray processes (never `ray stop`,
which ends every Ray process of the user on the machine).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

# Re-exported for the tests ("import x as x" marks a re-export).
from cluster.local_cluster import end_session as end_session
from cluster.local_cluster import pids_in_session as pids_in_session

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(**extra: str) -> dict:
    """The environment of a `splitvlm` subprocess: this checkout's code first."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.update(extra)
    return env


def run_cli(*args: str, env: dict, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def listening_addresses(pids: list[int]) -> list[str]:
    """`host:port` of every TCP socket these processes listen on (from /proc, no `ss` needed)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table in ("tcp", "tcp6"):
        lines = (Path("/proc/net") / table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            addresses.append(f"{_host(host_hex)}:{int(port_hex, 16)}")
    return addresses


def _host(host_hex: str) -> str:
    # /proc/net/tcp* store addresses as 32-bit words in host (little-endian) order.
    raw = b"".join(bytes.fromhex(host_hex[i : i + 8])[::-1] for i in range(0, len(host_hex), 8))
    if len(raw) == 4:
        return ".".join(map(str, raw))
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(map(str, raw[12:]))
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return (
        host.startswith(("127.", "::ffff:127."))
        or host == "0000:0000:0000:0000:0000:0000:0000:0001"
    )
