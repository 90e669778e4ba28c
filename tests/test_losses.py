"""MultiViewContrastiveLoss, single process, against a numpy reference. The loss has no
parameters: the logit scales come in (here exp of leaf temperatures, so their gradients show)."""
import math

import numpy as np
import paddle
import pytest

from ernievil2.losses import ContrastivePair, MultiViewContrastiveLoss

MAX_LOGIT_SCALE = math.log(100.0)


def _unit(rng, b, d):
    x = rng.standard_normal((b, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_pair_loss(a, b, scale, ids=None):
    """Symmetric (soft) cross-entropy, written out in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ids = np.arange(len(a)) if ids is None else np.asarray(ids)
    t = (ids[:, None] == ids[None, :]).astype(np.float64)
    t /= t.sum(axis=1, keepdims=True)
    logits = scale * a @ b.T
    ce_ab = -(t * _np_log_softmax(logits)).sum(axis=1).mean()
    ce_ba = -(t * _np_log_softmax(logits.T)).sum(axis=1).mean()
    return 0.5 * (ce_ab + ce_ba)


def _tensors(feats):
    return {k: paddle.to_tensor(v, stop_gradient=False) for k, v in feats.items()}


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return {v: _unit(rng, 6, 4) for v in ("image", "text", "image_aug")}


PAIRS = [ContrastivePair("image", "text", 1.0), ("image", "image_aug", 0.5)]
INIT = {"image-text": 1.5, "image-image_aug": 2.0}


def temperatures(init):
    """pair key -> leaf log temperature (trainable)."""
    return {k: paddle.to_tensor([float(v)], stop_gradient=False) for k, v in init.items()}


def scales(init):
    """pair key -> logit scale exp(t): a float / dict of log temperatures, or leaf tensors."""
    if not isinstance(init, dict):
        init = {k: init for k in ("image-text", "image-image_aug", "text-image", "text-text_aug")}
    return {k: paddle.exp(t if isinstance(t, paddle.Tensor) else paddle.to_tensor([float(t)]))
            for k, t in init.items()}


def test_matches_numpy_reference(feats):
    loss = MultiViewContrastiveLoss(PAIRS)
    total, info = loss(_tensors(feats), scales(INIT))
    ref_it = _np_pair_loss(feats["image"], feats["text"], math.exp(1.5))
    ref_ii = _np_pair_loss(feats["image"], feats["image_aug"], math.exp(2.0))
    np.testing.assert_allclose(float(info["loss/image-text"]), ref_it, rtol=1e-5)
    np.testing.assert_allclose(float(info["loss/image-image_aug"]), ref_ii, rtol=1e-5)
    np.testing.assert_allclose(float(total), ref_it + 0.5 * ref_ii, rtol=1e-5)
    np.testing.assert_allclose(float(info["logit_scale/image-text"]), math.exp(1.5), rtol=1e-6)


def test_hand_computed_two_rows():
    # a = b = identity rows, scale 1: each row's logits are (1, 0) -> CE = log(1 + e^-1).
    a = np.eye(2, dtype=np.float32)
    loss = MultiViewContrastiveLoss([("image", "text")])
    total, _ = loss({"image": paddle.to_tensor(a), "text": paddle.to_tensor(a)}, scales(0.0))
    np.testing.assert_allclose(float(total), math.log(1 + math.exp(-1)), rtol=1e-6)


def test_large_scale_loss_and_gradient_exact():
    # At logit scale 100 with random features some log-probabilities are far below -64, where
    # paddle's CPU softmax kernels clip; the loss must still equal the float64 reference.
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 8, 3), _unit(rng, 8, 3)
    x = _tensors({"image": a, "text": b})
    total, _ = MultiViewContrastiveLoss([("image", "text")])(x, scales(MAX_LOGIT_SCALE))
    np.testing.assert_allclose(float(total), _np_pair_loss(a, b, 100.0), rtol=1e-5)
    total.backward()
    # Analytic gradient of 0.5 * (CE(S a b^T) + CE(S b a^T)) with respect to a.
    a64, b64, n, eye = a.astype(np.float64), b.astype(np.float64), len(a), np.eye(len(a))
    p1 = np.exp(_np_log_softmax(100.0 * a64 @ b64.T))
    p2 = np.exp(_np_log_softmax(100.0 * b64 @ a64.T))
    grad_a = 0.5 * 100.0 * ((p1 - eye) @ b64 + (p2 - eye).T @ b64) / n
    np.testing.assert_allclose(x["image"].grad.numpy(), grad_a, rtol=1e-4, atol=1e-5)


def test_local_loss_false_same_single_process(feats):
    t1, _ = MultiViewContrastiveLoss(PAIRS)(_tensors(feats), scales(INIT))
    t2, _ = MultiViewContrastiveLoss(PAIRS, local_loss=False)(_tensors(feats), scales(INIT))
    np.testing.assert_allclose(float(t1), float(t2), rtol=1e-6)








def test_unicl_equals_clip_for_distinct_ids(feats):
    ids = paddle.to_tensor(np.array([10, 3, 7, 1, 0, 5], dtype=np.int64))
    t_clip, i_clip = MultiViewContrastiveLoss(PAIRS)(_tensors(feats), scales(INIT))
    t_uni, i_uni = MultiViewContrastiveLoss(PAIRS, targets="unicl")(
        _tensors(feats), scales(INIT), ids=ids)
    np.testing.assert_allclose(float(t_uni), float(t_clip), rtol=1e-6)
    for k in i_clip:
        np.testing.assert_allclose(float(i_uni[k]), float(i_clip[k]), rtol=1e-6)


def test_unicl_shared_ids_matches_reference_and_bound(feats):
    ids = np.array([0, 0, 1, 2, 2, 2], dtype=np.int64)
    loss = MultiViewContrastiveLoss([("image", "text")], targets="unicl")
    t_uni, _ = loss(_tensors(feats), scales(1.5), ids=paddle.to_tensor(ids))
    ref = _np_pair_loss(feats["image"], feats["text"], math.exp(1.5), ids)
    np.testing.assert_allclose(float(t_uni), ref, rtol=1e-5)
    t_clip, _ = MultiViewContrastiveLoss([("image", "text")])(_tensors(feats), scales(1.5))
    assert abs(float(t_uni) - float(t_clip)) > 1e-3
    # Lower bound: the mean entropy of the target rows, mean_i log(count_i).
    bound = np.mean(np.log([2, 2, 1, 3, 3, 3]))
    assert float(t_uni) >= bound - 1e-6
    # Reached when rows sharing an id have identical features and the scale is large.
    basis = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 2, 2]]
    sharp = MultiViewContrastiveLoss([("image", "text")], targets="unicl")
    t_sharp, _ = sharp({"image": paddle.to_tensor(basis), "text": paddle.to_tensor(basis)},
                       scales(MAX_LOGIT_SCALE), ids=paddle.to_tensor(ids))
    np.testing.assert_allclose(float(t_sharp), bound, atol=1e-4)


def test_pair_weights(feats):
    _, info = MultiViewContrastiveLoss(PAIRS)(_tensors(feats), scales(INIT))
    heavy = [("image", "text", 3.0), ("image", "image_aug", 0.25)]
    total, _ = MultiViewContrastiveLoss(heavy)(_tensors(feats), scales(INIT))
    expected = 3.0 * float(info["loss/image-text"]) + 0.25 * float(info["loss/image-image_aug"])
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_gradients_flow_to_temperatures_and_features(feats):
    loss = MultiViewContrastiveLoss(PAIRS)
    x, t = _tensors(feats), temperatures(INIT)
    total, _ = loss(x, scales(t))
    total.backward()
    for key in ("image-text", "image-image_aug"):
        g = t[key].grad.item()
        # Central finite difference of the weighted numpy loss in the pair's temperature.
        a, b = ("image", "text") if key == "image-text" else ("image", "image_aug")
        w = 1.0 if key == "image-text" else 0.5
        eps = 1e-4
        fd = w * (_np_pair_loss(feats[a], feats[b], math.exp(INIT[key] + eps))
                  - _np_pair_loss(feats[a], feats[b], math.exp(INIT[key] - eps))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)
    for v in ("image", "text", "image_aug"):
        assert float(x[v].grad.abs().sum()) > 0






def test_bad_input_errors(feats):
    with pytest.raises(ValueError, match="twice"):
        MultiViewContrastiveLoss([("image", "text"), ("text", "image")])
    with pytest.raises(ValueError, match="targets"):
        MultiViewContrastiveLoss(PAIRS, targets="siglip")
    with pytest.raises(KeyError, match="image_aug"):
        MultiViewContrastiveLoss(PAIRS)({"image": paddle.to_tensor(feats["image"]),
                                         "text": paddle.to_tensor(feats["text"])}, scales(INIT))
    with pytest.raises(KeyError, match="no logit scale for pairs \\['image-image_aug'\\]"):
        MultiViewContrastiveLoss(PAIRS)(_tensors(feats), {"image-text": paddle.to_tensor([1.0])})
    with pytest.raises(ValueError, match="needs ids"):
        MultiViewContrastiveLoss(PAIRS, targets="unicl")(_tensors(feats), scales(INIT))
    short = dict(_tensors(feats), text=paddle.to_tensor(feats["text"][:5]))
    with pytest.raises(ValueError, match="batch sizes"):
        MultiViewContrastiveLoss(PAIRS)(short, scales(INIT))
