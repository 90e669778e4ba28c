"""Worker for test_multinode.py: gather_rows in several rounds with ragged (and empty) shares, and
folder_writer on a folder both ranks share and on a folder each rank has alone.

    python -m paddle.distributed.launch --nproc_per_node 2 _dist_multinode_worker.py TMP
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "packages"))

from ernievil2.distributed import folder_writer, gather_rows, init_distributed  # noqa: E402

def rows(rank, count):
    """Row i of rank r holds (r, i, -i): where each row came from shows in the gathered result."""
    i = np.arange(count, dtype=np.float32)
    return np.stack([np.full_like(i, rank), i, -i], axis=1).reshape(-1, 3)


if __name__ == "__main__":
    tmp = sys.argv[1]
    rank, _ = init_distributed()
    gathered = {}
    # rows of rank 0 and rank 1: more rounds than one, and an empty share on either side
    for name, counts in (("ragged", [5, 0]), ("empty0", [0, 3])):
        got = gather_rows(rows(rank, counts[rank]), rows_per_round=2)
        if rank == 0:
            gathered[name] = [g.tolist() for g in got]
        else:
            assert got is None
    own = os.path.join(tmp, f"own{rank}")
    os.makedirs(own, exist_ok=True)
    writers = {"shared": folder_writer(tmp), "own": folder_writer(own)}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"writers": writers, "gathered": gathered, "left": sorted(os.listdir(own))}, f)
