"""ema_decay: the moving average of the trained weights (train/ema.py) and its resume."""
import os
import pickle
import shutil
import subprocess

import numpy as np
import paddle
import pytest

from ernievil2.train.ema import ModelEMA
from test_train_resume import cmd, losses, train_config


def test_shadow_follows_the_warmed_up_average_and_applied_swaps_back():
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    frozen = paddle.nn.Linear(2, 2)
    frozen.weight.stop_gradient = True
    model = paddle.nn.Sequential(layer, frozen)
    ema = ModelEMA(model, 0.9)
    assert "1.weight" not in ema.shadow and "0.weight" in ema.shadow  # frozen: not averaged
    want = layer.weight.numpy().copy()
    for t in range(5):
        layer.weight.set_value(layer.weight + 1.0)
        d = min(0.9, (1 + t) / (10 + t))
        want = d * want + (1 - d) * layer.weight.numpy()
        ema.update()
    np.testing.assert_allclose(ema.shadow["0.weight"].numpy(), want, rtol=1e-6)
    own = layer.weight.numpy().copy()
    with ema.applied():
        np.testing.assert_allclose(layer.weight.numpy(), want, rtol=1e-6)
    np.testing.assert_array_equal(layer.weight.numpy(), own)
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(model, 1.0)


@pytest.mark.slow
def test_final_model_is_the_average_and_resume_continues_it_exactly(tmp_path):
    over = dict(ema_decay=0.8, keep_last=10, max_steps=6)
    full_path, full = train_config(tmp_path / "full", **over)
    subprocess.run(cmd(full_path), check=True, capture_output=True, timeout=600)
    out = full["output_dir"]
    final = paddle.load(os.path.join(out, "final", "model.pdparams"))
    last = os.path.join(out, "checkpoints", "step_00000006")
    raw = paddle.load(os.path.join(last, "model.pdparams"))
    with open(os.path.join(last, "extra_ema.pkl"), "rb") as f:
        shadow = pickle.load(f)["shadow"]
    name = next(n for n in shadow if n.startswith("text_model."))
    np.testing.assert_allclose(np.asarray(final[name]), shadow[name], rtol=1e-6)
    assert not np.allclose(np.asarray(final[name]), np.asarray(raw[name]))  # not the last step
    # a run continued from the step-4 checkpoint ends with the same averaged weights
    res_path, res = train_config(tmp_path / "resumed", **over)
    os.makedirs(os.path.join(res["output_dir"], "checkpoints"))
    shutil.copytree(os.path.join(out, "checkpoints", "step_00000004"),
                    os.path.join(res["output_dir"], "checkpoints", "step_00000004"))
    subprocess.run(cmd(res_path, "resume=auto"), check=True, capture_output=True, timeout=600)
    got = paddle.load(os.path.join(res["output_dir"], "final", "model.pdparams"))
    for k in final:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(final[k]), atol=1e-6, err_msg=k)
    assert abs(losses(res["output_dir"])[6] - losses(out)[6]) <= 1e-6
