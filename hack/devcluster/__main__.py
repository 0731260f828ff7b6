"""``python -m devcluster up|down|status``: the local control plane (PYTHONPATH=hack).

``up`` prints one line per component and ends with ``export KUBECONFIG=<path>``, so
``eval $(make -s cluster-up | tail -1)`` points the shell at the cluster.
"""

from __future__ import annotations

import argparse
import sys

from devcluster.cluster import ClusterError, LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        cluster = LocalCluster()
        if args.command == "up":
            cluster.up(lambda line: print(line, flush=True))
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster.down()
        else:
            return 0 if cluster.status() else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
