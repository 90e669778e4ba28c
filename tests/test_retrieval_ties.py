"""Pessimistic recall (tied wrong candidates count against the query) next to the official,
optimistic one: collapsed embeddings, hand-counted ranks, a brute-force reference with exact ties,
and equality of the two rules when there are no ties."""

import numpy as np
import pytest

from ernievil2.metrics import retrieval
from ernievil2.metrics.retrieval import (
    multi_caption_ranks,
    multi_caption_recall,
    multi_caption_recall_both,
    official_recall,
    official_recall_both,
    paired_ranks,
    tie_gap,
    tie_warning,
)


def pessimistic_reference(text, image, ids):
    """Straight from the definition, on the full score matrix: a query's rank is the number of
    wrong candidates scoring at least its correct one; an image's rank is the best over its
    captions of the number of other images' captions scoring at least that caption."""
    keys = list(dict.fromkeys(ids))
    first = [ids.index(k) for k in keys]
    pos = np.array([keys.index(k) for k in ids])
    score = np.asarray(text, np.float32) @ np.asarray(image, np.float32)[first].T
    n, m = score.shape
    t2i = [sum(score[i, j] >= score[i, pos[i]] for j in range(m) if j != pos[i]) for i in range(n)]
    i2t = [min(sum(score[q, j] >= score[c, j] for q in range(n) if pos[q] != j)
               for c in range(n) if pos[c] == j) for j in range(m)]
    return np.array(t2i), np.array(i2t)


def tied_embeddings(rng, n, d=5):
    text = rng.integers(-1, 2, (n, d)).astype(np.float32)  # small integers: exact, frequent ties
    image = rng.integers(-1, 2, (n, d)).astype(np.float32)
    dup = rng.choice(n, size=n // 3)
    image[dup] = image[rng.permutation(dup)]
    return text, image


@pytest.mark.parametrize("n, ks, want", [
    (20, (1, 5, 10), [0.0, 0.0, 0.0]),  # every query ranks 19th (rank 19): no hit at all
    (8, (1, 5, 10), [0.0, 0.0, 1.0]),  # rank 7: only R@10 hits
    (8, (7, 8), [0.0, 1.0]),  # rank 7 < 8
])
@pytest.mark.parametrize("row", ["same", "zero"])
def test_identical_rows_official_protocol(n, ks, want, row):
    vec = np.zeros(16, np.float32) if row == "zero" else np.linspace(-1, 1, 16, dtype=np.float32)
    emb = np.tile(vec, (n, 1))
    both = official_recall_both(emb, emb, ks=ks)
    for name in ("Text2Image", "Image2Text", "MeanRecall"):
        assert [both["optimistic"][name][f"R@{k}"] for k in ks] == [1.0] * len(ks)
        assert [both["pessimistic"][name][f"R@{k}"] for k in ks] == want
    assert both["pessimistic"]["Text2Image"]["meanRecall"] == sum(want) / len(want)
    np.testing.assert_array_equal(paired_ranks(emb, emb, ties="pessimistic")[0], [n - 1] * n)
    np.testing.assert_array_equal(paired_ranks(emb, emb)[1], [0] * n)
    assert both["optimistic"] == official_recall(emb, emb, ks=ks)
    assert both["pessimistic"] == official_recall(emb, emb, ks=ks, ties="pessimistic")


def test_identical_rows_multi_caption():
    # 4 images with 3 captions each, all 12 rows identical
    emb = np.ones((12, 8), np.float32)
    ids = [f"img{i // 3}" for i in range(12)]
    both = multi_caption_recall_both(emb, emb, ids)
    assert both["optimistic"]["Text2Image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0,
                                                "meanRecall": 1.0}
    # a text ties with the 3 other images: rank 3; an image ties with the 9 other captions: rank 9
    t2i, i2t, _ = multi_caption_ranks(emb, emb, ids, ties="pessimistic")
    np.testing.assert_array_equal(t2i, [3] * 12)
    np.testing.assert_array_equal(i2t, [9] * 4)
    assert both["pessimistic"]["Text2Image"] == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0,
                                                 "meanRecall": 2 / 3}
    assert both["pessimistic"]["Image2Text"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 1.0,
                                                 "meanRecall": 1 / 3}
    assert both["pessimistic"] == multi_caption_recall(emb, emb, ids, ties="pessimistic")


def test_hand_counted_multi_caption_case():
    # images A = e1, B = e2, C = e3; the image column of later lines of an image is ignored
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    junk = np.float32([9, 9, 9])
    rows = [  # (image id, text, image on that line): scores A, B, C
        ("A", [1.0, 0.0, 0.0], e1),  # 1, 0, 0: nothing else >= 1          -> 0 (optimistic 0)
        ("A", [0.0, 1.0, 0.0], junk),  # 0, 1, 0: B and C are >= 0         -> 2 (optimistic 1)
        ("B", [0.0, 1.0, 0.0], e2),  # 0, 1, 0                              -> 0
        ("C", [0.5, 0.0, 0.4], e3),  # .5, 0, .4: A                         -> 1
        ("C", [0.6, 0.5, 0.0], junk),  # .6, .5, 0: A, B                    -> 2
        ("B", [0.0, 0.2, 0.9], junk),  # 0, .2, .9: C                       -> 1
    ]
    ids = [r[0] for r in rows]
    text = np.array([r[1] for r in rows], np.float32)
    image = np.array([r[2] for r in rows], np.float32)
    t2i, i2t, _ = multi_caption_ranks(text, image, ids, ties="pessimistic")
    np.testing.assert_array_equal(t2i, [0, 2, 0, 1, 2, 1])
    # A: best caption 1, no other caption >= 1 -> 0. B: best caption (line 3) scores 1 and line 2
    # (an A caption) ties it -> 1 (optimistic 0). C: best .4, line 6 scores .9 -> 1. Line 1 and 2
    # are both A's: their tie on column A would not count.
    np.testing.assert_array_equal(i2t, [0, 1, 1])
    np.testing.assert_array_equal(multi_caption_ranks(text, image, ids)[1], [0, 0, 1])


def test_tie_between_an_images_own_captions_does_not_count():
    emb = np.float32([[1, 0], [1, 0], [0, 1]])
    ids = ["A", "A", "B"]
    _, i2t, _ = multi_caption_ranks(emb, emb, ids, ties="pessimistic")
    np.testing.assert_array_equal(i2t, [0, 0])


@pytest.mark.parametrize("n, chunk_size", [(2, None), (7, 1), (23, 3), (57, None), (120, 16)])
def test_pessimistic_ranks_match_brute_force_reference(n, chunk_size):
    rng = np.random.default_rng(n)
    text, image = tied_embeddings(rng, n)
    ids = list(range(n))
    ref_t2i, ref_i2t = pessimistic_reference(text, image, ids)
    t2i, i2t = paired_ranks(text, image, chunk_size=chunk_size, ties="pessimistic")
    np.testing.assert_array_equal(t2i, ref_t2i)
    np.testing.assert_array_equal(i2t, ref_i2t)
    # several captions per image, in shuffled order
    ids = [int(k) for k in rng.integers(0, max(1, n // 3), n)]
    ref_t2i, ref_i2t = pessimistic_reference(text, image, ids)
    t2i, i2t, _ = multi_caption_ranks(text, image, ids, chunk_size=chunk_size, ties="pessimistic")
    np.testing.assert_array_equal(t2i, ref_t2i)
    np.testing.assert_array_equal(i2t, ref_i2t)


def test_pessimistic_recount_when_prepass_rounds_differently(monkeypatch):
    real = retrieval._positive_thresholds

    def one_ulp_high(*args):  # ties with the true threshold would be missed by ">="
        return np.nextafter(real(*args), np.float32(np.inf))

    monkeypatch.setattr(retrieval, "_positive_thresholds", one_ulp_high)
    rng = np.random.default_rng(9)
    text, image = tied_embeddings(rng, 90)
    _, i2t = paired_ranks(text, image, chunk_size=16, ties="pessimistic")
    np.testing.assert_array_equal(i2t, pessimistic_reference(text, image, list(range(90)))[1])


def test_without_ties_both_rules_agree_and_default_is_unchanged():
    rng = np.random.default_rng(4)
    text = rng.standard_normal((300, 32)).astype(np.float32)
    image = (text + rng.standard_normal((300, 32))).astype(np.float32)
    ids = [i // 2 for i in range(300)]
    both = official_recall_both(text, image)
    assert both["optimistic"] == both["pessimistic"] == official_recall(text, image)
    assert 0.2 < both["optimistic"]["Text2Image"]["R@1"] < 1.0  # a non-trivial table
    mc = multi_caption_recall_both(text, image, ids, chunk_size=7)
    assert mc["optimistic"] == mc["pessimistic"] == multi_caption_recall(text, image, ids)
    assert tie_gap(both) == 0.0 and tie_warning(both) is None


def test_tie_warning_names_both_figures():
    emb = np.ones((20, 4), np.float32)
    both = official_recall_both(emb, emb)
    assert tie_gap(both) == 100.0
    msg = tie_warning(both)
    assert "\n" not in msg and "R@1 is 100.00 points higher" in msg
    assert "Text2Image 100.00 vs 0.00" in msg and "Image2Text 100.00 vs 0.00" in msg
    # one tied query among 100 lines (text 0 scores images 0 and 1 equally) moves R@1 of both
    # directions by exactly 1 point: not more than the limit; two tied queries: 2 points
    image = np.eye(100, dtype=np.float32)
    text = image.copy()
    text[0, 1] = 1.0
    both = official_recall_both(text, image)
    assert both["pessimistic"]["Text2Image"]["R@1"] == both["pessimistic"]["Image2Text"]["R@1"] == 0.99
    assert tie_gap(both) == 1.0 and tie_warning(both) is None
    text[2, 3] = 1.0
    assert tie_gap(official_recall_both(text, image)) == 2.0
    assert "R@1 is 2.00 points higher" in tie_warning(official_recall_both(text, image))


def test_unknown_tie_rule_is_rejected():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="ties must be one of"):
        official_recall(emb, emb, ties="average")


@pytest.mark.parametrize("n, chunk_size", [
    (2041, 700),  # 2041 candidates: one past a group of 255 uint64 words of 8 bytes each
    (1027, 600),  # blocks of 600 rows: column lanes emptied mid-block (at most 255 rows each)
    (1023, None),  # candidates not a multiple of 8 (padded mask columns)
])
def test_counts_across_lane_groups_and_block_sizes(n, chunk_size):
    # counts up to n in every direction, many exact ties: each count is checked against plain
    # comparisons on the full matrix (exact in any BLAS order: small-integer embeddings)
    rng = np.random.default_rng(n)
    text, image = tied_embeddings(rng, n)
    text[: n // 4] = 0.0  # zero rows: ties with every candidate
    score = text @ image.T
    diag = np.diag(score)
    want = {"optimistic": ((score > diag[:, None]).sum(1), (score > diag[None, :]).sum(0)),
            "pessimistic": ((score >= diag[:, None]).sum(1) - 1,
                            (score >= diag[None, :]).sum(0) - 1)}
    for ties, (t2i, i2t) in want.items():
        got = paired_ranks(text, image, chunk_size=chunk_size, ties=ties)
        np.testing.assert_array_equal(got[0], t2i)
        np.testing.assert_array_equal(got[1], i2t)
    assert want["pessimistic"][0].max() == n - 1  # some query ties with every candidate
