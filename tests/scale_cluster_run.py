"""Run the scale flow on a 2-node local Ray cluster (``ray.cluster_utils.Cluster``, 1 CPU
per node), twice: the second run adds one experiment and must re-featurize only it.
A script, run by ``tests/test_scale.py`` in a subprocess: a Cluster cannot coexist with
the session's local Ray. Usage: scale_cluster_run.py CORPUS STORE; prints a JSON line."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(corpus: str, store: str) -> None:
    from ray.cluster_utils import Cluster

    from blis_model.releases.read import read_manifest
    from blis_model.synth.bulk import write_bulk_corpus
    from flows.calibrate_at_scale import run_at_scale

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        out = {"nodes": len(cluster.list_all_nodes()), "runs": []}
        for added in (0, 1):
            if added:
                write_bulk_corpus(corpus, 1, 1200, first=3)
            url = run_at_scale(corpus, store, ray_address=cluster.address)
            manifest = read_manifest(url)
            out["runs"].append({"url": url, "experiments": manifest["corpus"]["experiments"],
                                "scale": manifest["metrics"]["scale"],
                                "summary": manifest["metrics"]["summary"]})
        print("RESULT " + json.dumps(out))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
