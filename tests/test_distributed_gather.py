"""Two CPU processes (gloo) give the gradients of one process on the whole batch.

Convention: the loss of the whole batch is the mean over all global rows. Each rank's loss is the
mean over its local rows against all ranks' columns, so the whole-batch loss is the MEAN of the
rank losses, and the rank gradients averaged over ranks (all_reduce SUM / world, what
paddle.DataParallel does) equal the one-process gradient. Dropout masks are keyed by global row
(see _dist_worker.py), so both sides draw the same masks.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _dist_worker as W

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out, log = tmp / "out.npz", tmp / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(log), str(ROOT / "tests" / "_dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log.glob("workerlog.*")))
        pytest.fail(f"launch failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{logs}")
    return dict(np.load(out))


def _single_process(loss_kwargs):
    """Loss and gradients of one process on all N_GLOBAL rows (world size 1)."""
    towers = W.build_model()
    value, grads = W.run_scenario(towers, loss_kwargs, False, 0, W.N_GLOBAL, 0, 1)
    return value, grads


def _check(dist_result, scenario, loss_kwargs, exact=True):
    ref_loss, ref = _single_process(loss_kwargs)
    got = {k.split("/grad/", 1)[1]: v for k, v in dist_result.items()
           if k.startswith(f"{scenario}/grad/")}
    assert got.keys() == ref.keys()
    diff = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    losses = dist_result[f"{scenario}/losses"]
    if loss_kwargs.get("local_loss", True):
        np.testing.assert_allclose(losses.mean(), ref_loss, rtol=1e-6)
    else:
        np.testing.assert_allclose(losses, [ref_loss, ref_loss], rtol=1e-6)
    return diff


def test_clip_local_loss_matches_whole_batch(dist_result):
    assert _check(dist_result, "clip_local", dict(targets="clip", local_loss=True)) < 1e-5


def test_unicl_with_ids_shared_across_ranks_matches_whole_batch(dist_result):
    assert _check(dist_result, "unicl_local", dict(targets="unicl", local_loss=True)) < 1e-5


def test_global_logits_match_whole_batch(dist_result):
    assert _check(dist_result, "clip_global", dict(targets="clip", local_loss=False)) < 1e-5


def test_gradcache_across_ranks_matches_whole_batch(dist_result):
    assert _check(dist_result, "clip_local_gradcache", dict(targets="clip", local_loss=True)) < 1e-5


def test_without_gradient_through_gather_differs(dist_result):
    # Control: the comparison is sensitive to the cross-rank gradient the gather carries back.
    diff = _check(dist_result, "clip_local_nograd_gather", dict(targets="clip", local_loss=True))
    assert diff > 1e-4


def test_unequal_shapes_raise_clear_error_on_every_rank(dist_result):
    for msg in dist_result["shape_errors"]:
        assert "same tensor shape on every rank" in str(msg) and "(2, 3), (3, 3)" in str(msg)
