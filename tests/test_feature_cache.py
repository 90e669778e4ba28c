"""The frozen-image-feature cache: the same numbers as running the tower, and training from it
is training with the tower (image_feature_cache, train/feature_cache.py)."""
import subprocess

import numpy as np
import paddle
import pytest

from ernievil2.factory import build_dual_encoder as create_model
from ernievil2.tokenizer import ErnieTokenizer
from ernievil2.train.data import MultiViewBatcher, TrainIndex
from ernievil2.train.feature_cache import ImageFeatureCache, view_generator
from ernievil2.transforms import decode_image, make_eval_transform, make_train_transform
from ernievil2.data.tsv import decode_b64
from helpers import TINY_ERNIE, TINY_VIT, write_vocab
from test_train_parts import write_train_tsv
from test_train_resume import cmd, losses, train_config


def tiny_tower():
    paddle.seed(0)
    return create_model(dict(TINY_VIT), dict(TINY_ERNIE)).visual


def build(tmp_path, k=3, seed=5):
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv", n_images=5, captions=2))
    tf, ev = make_train_transform(32), make_eval_transform(32)
    return idx, tf, ev, ImageFeatureCache.build(tiny_tower(), idx, k, tf, ev, seed=seed, batch_size=4,
                                                progress=False)


def test_cached_views_are_the_tower_on_the_eval_and_seeded_augmented_views(tmp_path):
    idx, tf, ev, cache = build(tmp_path)
    assert cache.features.shape == (5, 3, TINY_VIT["width"])
    tower = tiny_tower()
    tower.eval()
    with open(idx.path, "rb") as f:
        _, fields = idx.read(f, 4)  # row 4 = first caption of image 2
    img = decode_image(decode_b64(fields[2]))
    with paddle.no_grad():
        want0 = tower(paddle.to_tensor(ev(img)[None])).numpy()[0]
        want2 = tower(paddle.to_tensor(tf(img, view_generator(5, 2, 2))[None])).numpy()[0]
    np.testing.assert_allclose(cache.features[2, 0], want0, atol=1e-5)
    np.testing.assert_allclose(cache.features[2, 2], want2, atol=1e-5)
    assert not np.allclose(cache.features[2, 1], cache.features[2, 2], atol=1e-4)  # different views


def test_batches_take_cached_features_of_two_distinct_views(tmp_path):
    idx, tf, ev, cache = build(tmp_path)
    tok = ErnieTokenizer.from_file(write_vocab(tmp_path / "v.txt"), max_seq_len=16)

    def batcher(rank, world):
        return MultiViewBatcher(idx, ["image", "image_aug", "text"], tok, tf, ev, seed=3, rank=rank,
                                world_size=world, num_workers=0, feature_cache=cache)
    rows = np.array([0, 3, 5, 9])
    whole = batcher(0, 1).batch(0, rows)
    assert whole["image"].shape == (4, TINY_VIT["width"])
    for i, row in enumerate(rows):
        image = idx.image_index[row]
        hits = [k for k in range(3) if np.array_equal(whole["image"][i], cache.features[image, k])]
        hits_aug = [k for k in range(3) if np.array_equal(whole["image_aug"][i], cache.features[image, k])]
        assert len(hits) == 1 and len(hits_aug) == 1 and hits != hits_aug
    halves = [batcher(r, 2).batch(0, rows) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])


def test_cache_requires_a_frozen_image_tower(tmp_path):
    path, _ = train_config(tmp_path, image_feature_cache=2, max_steps=1)
    r = subprocess.run(cmd(path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "image_feature_cache needs freeze_image_tower" in r.stderr


@pytest.mark.slow
def test_training_from_one_cached_view_equals_training_with_the_frozen_tower(tmp_path):
    """augment off: the live run feeds the eval view to the frozen tower every step, the cached
    run reads the tower's output on that view once; the losses must agree."""
    over = dict(max_steps=4, save_every=100, augment=False, freeze_image_tower=True,
                views=[["image", "text", 1.0], ["image", "image_aug", 0.5], ["text", "text_aug", 0.5]])
    live_path, live = train_config(tmp_path / "live", **over)
    cached_path, cached = train_config(tmp_path / "cached", image_feature_cache=1, **over)
    for p in (live_path, cached_path):
        subprocess.run(cmd(p), check=True, capture_output=True, timeout=600)
    a, b = losses(live["output_dir"]), losses(cached["output_dir"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    assert a[4] != a[1]  # and it trains


@pytest.mark.slow
def test_two_processes_share_the_cache_work_and_train_like_one(tmp_path):
    """Each process caches half the images; gathered, the run trains the same weights as one
    process (the logged loss is rank 0's rows only, so the weights are compared)."""
    from helpers import write_json
    over = dict(max_steps=3, save_every=100, freeze_image_tower=True, image_feature_cache=2,
                views=[["image", "text", 1.0], ["image", "image_aug", 0.5]])
    runs = {}
    for name, devices in (("one", "0"), ("two", "0,1")):
        path, c = train_config(tmp_path / name, **over)
        write_json(type(tmp_path)(c["text_model_config"]),
                   {**TINY_ERNIE, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
        env = {**__import__("os").environ, "LAUNCH_LOG_DIR": str(tmp_path / name / "launch")}
        r = subprocess.run(["bash", "run_train.sh", devices, path], capture_output=True, text=True,
                           timeout=600, env=env, cwd=str(__import__("conftest").ROOT))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = paddle.load(str(type(tmp_path)(c["output_dir"]) / "final" / "model.pdparams"))
    one, two = runs["one"], runs["two"]
    assert set(one) == set(two)
    for k in one:
        np.testing.assert_allclose(np.asarray(one[k]), np.asarray(two[k]), atol=2e-5, err_msg=k)


def test_cache_dir_reuses_a_matching_cache_and_rebuilds_on_any_change(tmp_path):
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv", n_images=3, captions=1))
    tf, ev = make_train_transform(32), make_eval_transform(32)
    tower = tiny_tower()

    def get(tower=tower, k=2, seed=1):
        return ImageFeatureCache.load_or_build(str(tmp_path / "c"), tower, idx, k, tf, ev, seed,
                                               progress=False)
    first = get()
    files = sorted((tmp_path / "c").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    np.save(files[0], first.features + 1.0)  # a marker: a reused cache is read, not recomputed
    np.testing.assert_array_equal(get().features, first.features + 1.0)
    get(k=3)
    get(seed=2)
    other = tiny_tower()
    for p in other.parameters():
        p.set_value(p + 0.01)
        break
    get(tower=other)
    assert len(list((tmp_path / "c").iterdir())) == 4  # K, seed and weights are in the key


def test_inference_runner_gives_the_eager_features(tmp_path):
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv", n_images=3, captions=1))
    tf, ev = make_train_transform(32), make_eval_transform(32)
    towers = {r: tiny_tower() for r in ("eager", "inference")}
    got = {r: ImageFeatureCache.build(t, idx, 2, tf, ev, seed=1, progress=False, runner=r).features
           for r, t in towers.items()}
    np.testing.assert_allclose(got["inference"], got["eager"], atol=1e-5)
    # exporting traced a copy: the training model's tower is still the eager layer
    assert type(towers["inference"]).forward is type(towers["eager"]).forward
    assert "StaticFunction" not in type(towers["inference"].forward).__name__
    with pytest.raises(ValueError, match="runner"):
        ImageFeatureCache.build(tiny_tower(), idx, 1, tf, ev, seed=1, progress=False, runner="gpu")


def test_cache_keeps_feature_maps_of_any_shape(tmp_path):
    """A tower returning maps (e.g. EfficientNet.forward_trunk) is cached as [images, K, C, H, W]."""
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv", n_images=3, captions=2))
    paddle.seed(0)
    conv = paddle.nn.Conv2D(3, 4, 8, stride=8)
    cache = ImageFeatureCache.build(conv, idx, 2, make_train_transform(32), make_eval_transform(32),
                                    seed=0, progress=False)
    assert cache.features.shape == (3, 2, 4, 4, 4)
    assert cache.take([2, 0], [1, 0]).shape == (2, 4, 4, 4)
