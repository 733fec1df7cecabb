"""A multi-node Ray cluster on this machine, for trying multi-node jobs and testing them.

Each node is a `ray start` of its own that binds its own loopback address (the head 127.0.0.2,
then 127.0.0.3, …) with its own CPUs, its own temp directory (TMPDIR: node-local caches and
locks, as a real node's /tmp) and Ray temp directory. What such nodes share and real ones do not:
/dev/shm, the file system, the process table.

Every port is chosen free on loopback and nothing binds beyond 127.0.0.0/8. The cluster uses
token authentication with a token of its own (never ~/.ray/auth_token). Each node is started in
a session of its own and stopped by that session id: exactly the processes it started end
(never `ray stop`, which ends every Ray process on the machine). The cluster's state (addresses,
ports, session ids) is kept in ROOT/cluster.json, so `scripts/local_cluster.py` can stop what an
earlier call started.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "cluster.json"
NODE_START_TIMEOUT_S = 300.0


@dataclass
class LocalNode:
    index: int  # 0 is the head
    address: str  # the node's loopback address
    num_cpus: int
    session_id: int = 0  # of its processes; 0 while stopped

    @property
    def name(self) -> str:
        return f"node{self.index}"


@dataclass
class LocalCluster:
    """`LocalCluster.create(root, num_nodes, cpus_per_node).start()`, then `.address` and
    `.env` for drivers (`splitvlm train --set cluster.address=…` with that environment)."""

    root: Path
    nodes: list[LocalNode]
    gcs_port: int
    dashboard_port: int
    extra_ports: dict = field(default_factory=dict)  # per node: the ports Ray would pick itself
    # Extra environment of the nodes' processes, e.g. Ray's RAY_health_check_* settings (how
    # soon a lost node is declared dead).
    node_env: dict = field(default_factory=dict)

    @classmethod
    def create(
        cls, root: Path, num_nodes: int = 2, cpus_per_node: int = 1, node_env: dict | None = None
    ) -> LocalCluster:
        if not 1 <= num_nodes <= 250:
            raise ValueError(f"num_nodes={num_nodes}: give 1 to 250 nodes")
        root = Path(root)
        # Ray's unix sockets live under the node directories: a path over 107 bytes fails.
        if len(str(root)) > 40:
            raise ValueError(f"{root}: keep the cluster directory short (Ray's socket paths)")
        root.mkdir(parents=True, exist_ok=True)
        token = root / "auth_token"
        if not token.is_file():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        nodes = [LocalNode(i, f"127.0.0.{2 + i}", cpus_per_node) for i in range(num_nodes)]
        return cls(
            root, nodes, gcs_port=_free_port(), dashboard_port=_free_port(), node_env=node_env or {}
        )

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        path = Path(root) / STATE_FILE
        if not path.is_file():
            raise ValueError(f"no local cluster in {root} ({STATE_FILE} is missing)")
        state = json.loads(path.read_text())
        state["nodes"] = [LocalNode(**node) for node in state["nodes"]]
        return cls(root=Path(root), **{k: v for k, v in state.items() if k != "root"})

    def save(self) -> None:
        state = {**asdict(self), "root": str(self.root)}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

    @property
    def address(self) -> str:
        """The GCS address drivers join (`cluster.address`)."""
        return f"{self.nodes[0].address}:{self.gcs_port}"

    @property
    def jobs_address(self) -> str:
        return f"http://{self.nodes[0].address}:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a driver or a `ray` command of this cluster."""
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # Ray's local-only mode binds every server to 127.0.0.1; nodes need their own address.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.pop("RAY_ADDRESS", None)
        return env

    def node_dir(self, node: LocalNode) -> Path:
        return self.root / node.name

    def node_tmp(self, node: LocalNode) -> Path:
        """The node's TMPDIR: its streaming caches and locks, remote-stream caches by default."""
        return self.node_dir(node) / "tmp"

    def start(self) -> LocalCluster:
        for node in self.nodes:
            self.start_node(node.index)
        return self

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        assert node.session_id == 0 or not _session_alive(node.session_id), f"{node.name} runs"
        self.node_tmp(node).mkdir(parents=True, exist_ok=True)
        ports = self.extra_ports.setdefault(node.name, _node_ports(node.address))
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            f"--node-ip-address={node.address}",
            f"--num-cpus={node.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.node_dir(node) / 'ray'}",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        if index == 0:
            command += [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-host={node.address}",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            command.append(f"--address={self.address}")
        env = {**self.env, **self.node_env, "TMPDIR": str(self.node_tmp(node))}
        node.session_id, returncode, output = start_in_new_session(command, env)
        self.save()
        if returncode != 0:
            self.stop_node(index)
            raise RuntimeError(f"ray start of {node.name} failed:\n{output[-3000:]}")

    def node_pids(self, index: int, name: str) -> list[int]:
        """The node's processes whose command line contains `name` (e.g. "raylet", or
        "RayTrainWorker": Ray titles its worker processes after the actor they run)."""
        found = []
        for pid in pids_in_session(self.nodes[index].session_id):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if name.encode() in command:
                found.append(pid)
        return found

    def raylet_pid(self, index: int) -> int:
        """The pid of a node's raylet (what a lost machine takes with it)."""
        pids = [p for p in self.node_pids(index, "raylet") if _comm(p) == "raylet"]
        if not pids:
            raise RuntimeError(f"{self.nodes[index].name} has no raylet")
        return pids[0]

    def stop_node(self, index: int) -> None:
        node = self.nodes[index]
        if node.session_id:
            end_session(node.session_id)
        node.session_id = 0
        self.save()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node.index)


def start_in_new_session(
    command: list[str], env: dict, timeout: float = NODE_START_TIMEOUT_S
) -> tuple[int, int, str]:
    """Run a command that starts daemons (`ray start`) in a session of its own, so everything it
    starts is found and ended by that session id; returns (session id, exit code, output)."""
    starter = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output, _ = starter.communicate(timeout=timeout)
    return starter.pid, starter.returncode, output


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _node_ports(host: str) -> dict[str, int]:
    """Free ports for what each node serves (Ray would otherwise pick fixed defaults, and a
    second cluster on the machine would collide with the first)."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "runtime-env-agent-port",
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
        "ray-client-server-port",
    )
    return {name: _free_port(host) for name in names}


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pids_in_session(session_id: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `session_id`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session.
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _session_alive(session_id: int) -> bool:
    return bool(pids_in_session(session_id))


def end_session(session_id: int, timeout: float = 5.0) -> None:
    """SIGTERM every process of the session, SIGKILL what is left after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pids_in_session(session_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_in_session(session_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids_in_session(session_id):
            return
