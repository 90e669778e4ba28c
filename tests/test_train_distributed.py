"""Negatives from every rank, with gradient: 2 CPU processes == 1 process on the whole batch,
on the real towers with dropout on in the text tower (its randomness replayed per half)."""
import numpy as np
import pytest

import _dist_train_worker as W
from helpers import launch_worker

pytestmark = pytest.mark.slow


def test_two_processes_give_the_whole_batch_gradients(tmp_path):
    out = tmp_path / "grads.npz"
    got = launch_worker(tmp_path, "_dist_train_worker.py", out=out)
    _, ref = W.reference()
    assert set(ref) <= set(got)
    worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    assert worst < 1e-5, worst
    # the text tower's dropout really is on: other random states give other gradients
    _, other = W.reference(seed=W.SEED + 100)
    assert max(float(np.abs(got[k] - other[k]).max()) for k in ref if "text_model" in k) > 1e-3
