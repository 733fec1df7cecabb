"""A multi-node Ray cluster on this machine, to try multi-node splitvlm jobs without machines.

    python scripts/local_cluster.py start --nodes 2 --cpus-per-node 1   # prints how to use it
    python scripts/local_cluster.py stop                                 # ends what start started

Each node binds its own loopback address (127.0.0.2, 127.0.0.3, …) with its own CPUs and temp
directory; see cluster/local_cluster.py for what they share that real nodes do not. `stop` ends
exactly the processes `start` started (by session id), never other Ray instances.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local_cluster import LocalCluster  # noqa: E402

DEFAULT_ROOT = "/tmp/splitvlm-nodes"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the cluster's directory (short)")
    parser.add_argument("--nodes", type=int, default=2, help="start: nodes, the head included")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="start: logical CPUs each")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.action == "start":
        cluster = LocalCluster.create(root, args.nodes, args.cpus_per_node).start()
        token = shlex.quote(str(root / "auth_token"))
        print(f"started {len(cluster.nodes)} nodes: {', '.join(n.address for n in cluster.nodes)}")
        print("use it with:")
        print(f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}")
        print("  unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        print(
            f"  splitvlm train yaml/tiny.yaml --set cluster.address={cluster.address} "
            "--set cluster.num_workers=2 --set cluster.placement_strategy=SPREAD "
            "--set engine.name=fsdp"
        )
        print(f"  splitvlm submit yaml/tiny.yaml --address {cluster.jobs_address}")
        print(f"stop it with: python scripts/local_cluster.py stop --root {shlex.quote(args.root)}")
        return 0
    try:
        cluster = LocalCluster.load(root)
    except ValueError as err:
        print(f"local_cluster: {err}", file=sys.stderr)
        return 2
    if args.action == "stop":
        cluster.stop()
        print(f"stopped the nodes of {root}")
    else:
        for node in cluster.nodes:
            state = f"session {node.session_id}" if node.session_id else "stopped"
            print(f"{node.name} {node.address} {node.num_cpus} CPUs: {state}")
        print(f"address {cluster.address}, jobs {cluster.jobs_address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
