"""pipeline/distributed.py's collectives on 2 real gloo processes (torchrun): the packed sums a log
line uses and the asynchronous sum of the firing counts give every rank the exact totals, and a
timed TopK path is rank 0's on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_cli import REPO

SCRIPT = """
import json, os, sys
import torch
from pipeline.distributed import join_ranks, leave_ranks
ranks = join_ranks("cpu")
r = ranks.rank + 1
counts = torch.arange(5, dtype=torch.int32) * r  # the firing counts' dtype
pending = ranks.all_reduce_sum_async(counts)
mixed = [torch.tensor(0.1 * r, dtype=torch.float64), torch.arange(3, dtype=torch.int64) * r,
         torch.full((2, 2), 2.0 ** 60 * r, dtype=torch.float64), torch.tensor(r, dtype=torch.int64)]
summed = ranks.all_reduce_sums(mixed)  # runs while the async sum may still be in flight
done = pending()
result = {"same_tensor": done is counts, "counts": done.tolist(), "unchanged": mixed[1].tolist(),
          "summed": [[str(t.dtype), list(t.shape), t.flatten().tolist()] for t in summed]}
open(os.path.join(sys.argv[1], f"rank-{ranks.rank}.json"), "w").write(json.dumps(result))
leave_ranks()
"""

# Each rank times the paths with its own clock: on rank 0 sparse is faster, on rank 1 dense.
DECODE_SCRIPT = """
import json, os, sys, time
from pipeline.distributed import join_ranks, leave_ranks
from pipeline.sae import decode_path
ranks = join_ranks("cpu")
problem = decode_path.Problem("cpu", "float32", 64, 512, 128, False)  # near the crossover: timed
fast = ranks.rank == 0  # which path this rank finds faster: sparse on rank 0
decode_path.settle(problem, 4096, lambda sparse: time.sleep(0.001 if sparse == fast else 0.02),
                   agree=ranks.broadcast_json)
open(os.path.join(sys.argv[1], f"rank-{ranks.rank}.json"), "w").write(json.dumps(decode_path.paths.all()))
leave_ranks()
"""


def run_two_ranks(tmp_path, script: str) -> None:
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "script.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_rank_takes_rank_0s_timed_topk_path(tmp_path):
    run_two_ranks(tmp_path, DECODE_SCRIPT)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == {"cpu float32 64->512 k<=128": "sparse"}


def test_packed_and_asynchronous_sums_are_exact_on_every_rank(tmp_path):
    run_two_ranks(tmp_path, SCRIPT)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert got["same_tensor"] and got["counts"] == [0, 3, 6, 9, 12]  # summed in place: 1x + 2x
        assert got["unchanged"] == [0, rank + 1, 2 * (rank + 1)]  # all_reduce_sums leaves its inputs alone
        assert got["summed"] == [["torch.float64", [], [0.1 + 0.2]], ["torch.int64", [3], [0, 3, 6]],
                                 ["torch.float64", [2, 2], [3 * 2.0 ** 60] * 4], ["torch.int64", [], [3]]]
