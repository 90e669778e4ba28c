"""embed.embed, the loop inference and validation share: rows in line order with their line
numbers and image ids, bad lines skipped and reported, empty shards; model_towers."""
import numpy as np
import paddle

from ernievil2.data.pipeline import BatchLoader
from ernievil2.embed import Towers, embed, model_towers
from ernievil2.factory import build_dual_encoder
from ernievil2.transforms import decode_image, make_eval_transform
from helpers import TINY_ERNIE, TINY_VIT, tsv_line, make_image, write_tsv

DIM = 4


def feature_towers():
    """Deterministic stand-ins: the image row is the mean pixel, the text row its first ids."""
    def image(x):
        return np.repeat(x.mean(axis=(1, 2, 3))[:, None], DIM, 1).astype(np.float32)

    def text(ids):
        return ids[:, :DIM].astype(np.float32)
    return Towers(image, text, DIM)


def encode_texts(texts):
    """One id per character (its code point), padded with 0 to the longest: DIM columns at least."""
    width = max(DIM, max(len(t) for t in texts))
    return np.array([[ord(c) for c in t] + [0] * (width - len(t)) for t in texts], np.int64)


def loader(path, **kw):
    return BatchLoader(path, 2, image_transform=make_eval_transform(32), text_encoder=encode_texts,
                       decode_image=decode_image, **kw)


def test_rows_follow_the_file_with_line_numbers_and_ids(tmp_path):
    rows = [(f"text{k}", f"img{k}", k) for k in range(5)]
    path = write_tsv(tmp_path / "a.tsv", rows)
    emb = embed(feature_towers(), loader(path))
    assert emb.line_numbers.tolist() == [1, 2, 3, 4, 5]
    assert emb.image_ids == [f"img{k}" for k in range(5)]
    np.testing.assert_array_equal(emb.text, encode_texts([r[0] for r in rows])[:, :DIM])
    transform = make_eval_transform(32)
    means = [transform(decode_image(make_image(k))).mean() for k in range(5)]
    np.testing.assert_allclose(emb.image[:, 0], means, rtol=1e-6)
    assert emb.text.dtype == emb.image.dtype == np.float32 and not emb.skip_report


def test_bad_lines_are_skipped_and_reported_and_shards_keep_their_lines(tmp_path):
    good = [tsv_line(f"text{k}", f"img{k}", make_image(k)) for k in range(4)]
    lines = good[:2] + ["bad\tid\tnot*base64"] + good[2:]
    path = tmp_path / "a.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    emb = embed(feature_towers(), loader(path, skip_bad_lines=True))
    assert emb.line_numbers.tolist() == [1, 2, 4, 5]
    assert emb.skip_report.line_numbers == [3]
    shard = embed(feature_towers(), loader(path, rank=1, world_size=2, skip_bad_lines=True))
    assert shard.line_numbers.tolist() == [2, 4]
    np.testing.assert_array_equal(shard.text, emb.text[[1, 2]])


def test_an_empty_shard_gives_empty_arrays_of_the_embedding_width(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", [("text", "img", 0)])
    emb = embed(feature_towers(), loader(path, rank=1, world_size=2))
    assert emb.text.shape == emb.image.shape == (0, DIM)
    assert emb.line_numbers.shape == (0,) and emb.image_ids == []


def test_model_towers_are_the_model_under_no_grad_compiled_or_not():
    paddle.seed(0)
    model = build_dual_encoder(dict(TINY_VIT), dict(TINY_ERNIE))
    model.eval()
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(5, 64, (3, 7))
    with paddle.no_grad():
        want_image = model.encode_image(paddle.to_tensor(pixels)).numpy()
        want_text = model.encode_text(paddle.to_tensor(ids)).numpy()
    for towers in (model_towers(model), model_towers(model, to_static=True, image_size=32)):
        assert towers.embed_dim == want_image.shape[1]
        np.testing.assert_allclose(towers.encode_image(pixels), want_image, atol=1e-5, rtol=0)
        np.testing.assert_allclose(towers.encode_text(ids), want_text, atol=1e-5, rtol=0)


def counting(towers):
    """The towers, with the image rows each call receives counted."""
    calls = []

    def image(x):
        calls.append(len(x))
        return towers.encode_image(x)
    return Towers(image, towers.encode_text, towers.embed_dim), calls


def test_each_distinct_image_goes_through_the_image_tower_once(tmp_path):
    # 5 captions a photo (AIC-ICC, Flickr), over batch edges, one photo again much later, and a
    # photo under two ids: images are told apart by their bytes, never by the id column
    photos = {k: make_image(k) for k in range(4)}
    order = [0] * 5 + [1] * 5 + [2] * 5 + [0, 3, 3]
    ids = [f"p{k}" for k in order[:-1]] + ["other_id"]
    lines = [tsv_line(f"caption {n}", image_id, photos[k])
             for n, (k, image_id) in enumerate(zip(order, ids))]
    path = tmp_path / "multi.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    towers, calls = counting(feature_towers())
    emb = embed(towers, loader(path))
    assert sum(calls) == 4  # the distinct photos
    transform = make_eval_transform(32)
    per_line = [transform(decode_image(photos[k])).mean() for k in order]
    np.testing.assert_allclose(emb.image[:, 0], per_line, rtol=1e-6)  # every line its photo's row
    assert emb.image_ids == ids and emb.line_numbers.tolist() == list(range(1, len(order) + 1))

    # two processes: lines alternate between them, so each one embeds the photos it sees once
    for rank in (0, 1):
        towers, calls = counting(feature_towers())
        shard = embed(towers, loader(path, rank=rank, world_size=2))
        assert sum(calls) == len({order[i] for i in range(rank, len(order), 2)})
        np.testing.assert_array_equal(shard.image, emb.image[rank::2])

    # two processes sharded by image (run_infer): each photo through the tower once in all
    calls_by_rank, lines = [], []
    for rank in (0, 1):
        towers, calls = counting(feature_towers())
        shard = embed(towers, loader(path, rank=rank, world_size=2, shard="image"))
        calls_by_rank.append(sum(calls))
        lines += shard.line_numbers.tolist()
        np.testing.assert_array_equal(shard.image, emb.image[shard.line_numbers - 1])
        np.testing.assert_array_equal(shard.text, emb.text[shard.line_numbers - 1])
    assert sum(calls_by_rank) == 4 and min(calls_by_rank) > 0  # both ranks had photos
    assert sorted(lines) == list(range(1, len(order) + 1))


def test_the_progress_bar_counts_the_lines_of_the_file(tmp_path, capsys):
    # a rank's share of an image-sharded file is not known up front: the bar goes over the file
    lines = [tsv_line(f"caption {n}", f"p{k}", make_image(k)) for k in range(3) for n in range(5)]
    path = tmp_path / "multi.tsv"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    for rank in (0, 1):
        embed(feature_towers(), loader(path, rank=rank, world_size=2, shard="image"), progress=True)
        assert "15/15" in capsys.readouterr().err
