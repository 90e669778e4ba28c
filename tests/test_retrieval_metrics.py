"""Retrieval metrics and the embeddings file: chunked ranks against a full-matrix reference that
follows the official eval_retri.py definition, the multi-caption protocol on a hand-built case,
exact float parsing/printing, malformed files, and the binary sidecar."""
import tracemalloc
import warnings

import numpy as np
import pytest
from conftest import need_shared
from tabulate import tabulate

from ernievil2.embeddings import parser as eio
from ernievil2.metrics import retrieval
from ernievil2.embeddings import (
    EmbeddingFormatError,
    StaleSidecarWarning,
    format_float32_rows,
    read_embeddings,
    sidecar_path,
    write_embeddings,
)
from ernievil2.metrics.retrieval import (
    format_table,
    multi_caption_ranks,
    multi_caption_recall,
    official_recall,
    official_recall_both,
    paired_ranks,
    percent_table,
    recall_row,
)

# ---------------------------------------------------------------------------------------------
# reference: the official definition on the full score matrix
# ---------------------------------------------------------------------------------------------


def reference_ranks(text, image):
    score = np.asarray(text, np.float32) @ np.asarray(image, np.float32).T
    t2i = np.array([(score[i] > score[i, i]).sum() for i in range(len(score))])
    i2t = np.array([(score[:, j] > score[j, j]).sum() for j in range(len(score))])
    return t2i, i2t


def reference_recalls(ranks):
    n = float(len(ranks))
    r1, r5, r10 = ((ranks < 1).sum() / n, (ranks < 5).sum() / n, (ranks < 10).sum() / n)
    return [r1, r5, r10, (r1 + r5 + r10) / 3.0]


def reference_table(text, image):
    """What the official script prints, written from its definition."""
    t2i_ranks, i2t_ranks = reference_ranks(text, image)
    t2i, i2t = reference_recalls(t2i_ranks), reference_recalls(i2t_ranks)
    table = [["Text2Image"] + [round(j * 100, 2) for j in t2i],
             ["Image2Text"] + [round(j * 100, 2) for j in i2t],
             ["MeanRecall"] + [round((t2i[i] + i2t[i]) / 2 * 100, 2) for i in range(4)]]
    return tabulate(table, headers=["Name", "R@1", "R@5", "R@10", "meanRecall"],
                    tablefmt="github", floatfmt=".2f")


def tied_embeddings(rng, n, d=6):
    """Small-integer embeddings: every dot product is exact, so ties are exact and frequent."""
    text = rng.integers(-2, 3, (n, d)).astype(np.float32)
    image = rng.integers(-2, 3, (n, d)).astype(np.float32)
    dup = rng.choice(n, size=n // 3, replace=True)
    image[dup] = image[rng.permutation(dup)]  # duplicated images
    return text, image


# ---------------------------------------------------------------------------------------------
# official protocol
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 23, 57, 230, 1001])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 64])
def test_paired_ranks_match_full_matrix_with_exact_ties(n, chunk_size):
    rng = np.random.default_rng(n)
    text, image = tied_embeddings(rng, n)
    t2i, i2t = paired_ranks(text, image, chunk_size=chunk_size)
    ref_t2i, ref_i2t = reference_ranks(text, image)
    np.testing.assert_array_equal(t2i, ref_t2i)
    np.testing.assert_array_equal(i2t, ref_i2t)


@pytest.mark.parametrize("n", [4, 33, 500])
def test_official_table_matches_reference_on_float_embeddings(n):
    rng = np.random.default_rng(100 + n)
    text = rng.standard_normal((n, 48)).astype(np.float32)
    image = (text + 1.5 * rng.standard_normal((n, 48))).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    assert format_table(official_recall(text, image)) == reference_table(text, image)
    assert format_table(official_recall(text, image, chunk_size=7)) == reference_table(text, image)


def test_official_recall_values_use_official_arithmetic():
    rng = np.random.default_rng(5)
    text, image = tied_embeddings(rng, 37)
    rows = official_recall(text, image)
    t2i_ranks, i2t_ranks = reference_ranks(text, image)
    t2i, i2t = reference_recalls(t2i_ranks), reference_recalls(i2t_ranks)
    assert list(rows) == ["Text2Image", "Image2Text", "MeanRecall"]
    assert list(rows["Text2Image"].values()) == t2i  # bit-identical floats
    assert list(rows["Image2Text"].values()) == i2t
    assert list(rows["MeanRecall"].values()) == [(a + b) / 2 for a, b in zip(t2i, i2t)]


def test_image_to_text_recount_when_prepass_rounds_differently(monkeypatch):
    # if BLAS rounds a positive score differently in the pre-pass, the exact recount must win
    real = retrieval._positive_thresholds

    def off_by_one_ulp(*args):  # one ulp low: exact ties would wrongly count as "above"
        t = real(*args)
        return np.nextafter(t, np.float32(-np.inf))

    monkeypatch.setattr(retrieval, "_positive_thresholds", off_by_one_ulp)
    rng = np.random.default_rng(9)
    text, image = tied_embeddings(rng, 120)
    t2i, i2t = paired_ranks(text, image, chunk_size=16)
    ref_t2i, ref_i2t = reference_ranks(text, image)
    np.testing.assert_array_equal(t2i, ref_t2i)
    np.testing.assert_array_equal(i2t, ref_i2t)


def test_non_finite_embeddings_are_rejected():
    text = np.eye(4, dtype=np.float32)
    bad = text.copy()
    bad[2, 1] = np.nan  # NaN compares False, so it would silently count as a hit
    with pytest.raises(ValueError, match="NaN"):
        official_recall(bad, text)
    with pytest.raises(ValueError, match="same shape"):
        official_recall(text, text[:3])


def test_row_blocks_follow_official_blocks_and_avoid_single_rows():
    official_blocks = [(a, a + 1000) for a in range(0, 10000, 1000)]
    assert retrieval._row_blocks(10000, 10000, None) == official_blocks
    assert retrieval._row_blocks(23, 23, None) == [(0, 23)]
    assert retrieval._row_blocks(5, 5, 2) == [(0, 2), (2, 5)]
    blocks = retrieval._row_blocks(100_001, 100_001, None)
    assert max(b - a for a, b in blocks) * 100_001 * 4 <= retrieval.SCORE_BLOCK_BYTES
    assert blocks[0][0] == 0 and blocks[-1][1] == 100_001


@pytest.mark.parametrize("recall", [official_recall, official_recall_both])
def test_scores_are_never_held_as_a_full_matrix(recall):
    """Both tie rules too: the pessimistic counts add no full-size temporary."""
    n = 3000
    rng = np.random.default_rng(1)
    text = rng.standard_normal((n, 16)).astype(np.float32)
    image = rng.standard_normal((n, 16)).astype(np.float32)
    tracemalloc.start()
    try:
        recall(text, image, chunk_size=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n * 4 / 4  # a full float32 score matrix would be 36 MB


def test_format_table_is_the_official_table():
    rows = {"Text2Image": recall_row(np.array([0, 0, 1, 5])),  # 50, 75, 100 -> 75
            "Image2Text": recall_row(np.array([0, 9, 10, 11])),  # 25, 25, 50 -> 33.33
            }
    rows["MeanRecall"] = {k: (rows["Text2Image"][k] + rows["Image2Text"][k]) / 2
                          for k in rows["Text2Image"]}
    assert format_table(rows) == (
        "| Name       |   R@1 |   R@5 |   R@10 |   meanRecall |\n"
        "|------------|-------|-------|--------|--------------|\n"
        "| Text2Image | 50.00 | 75.00 | 100.00 |        75.00 |\n"
        "| Image2Text | 25.00 | 25.00 |  50.00 |        33.33 |\n"
        "| MeanRecall | 37.50 | 50.00 |  75.00 |        54.17 |")
    assert percent_table(rows)["Image2Text"]["meanRecall"] == 33.33


# ---------------------------------------------------------------------------------------------
# multi-caption protocol
# ---------------------------------------------------------------------------------------------


def hand_built_multi_caption():
    # images A = e1, B = e2, C = e3; the image column of later lines of an image is ignored
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    junk = np.float32([9, 9, 9])
    rows = [  # (image id, text, image embedding on that line)
        ("A", [1.0, 0.0, 0.0], e1),  # scores A B C = 1, 0, 0   -> rank 0
        ("A", [0.0, 1.0, 0.0], junk),  # 0, 1, 0: B beats A       -> rank 1
        ("B", [0.0, 1.0, 0.0], e2),  # 0, 1, 0                    -> rank 0
        ("C", [0.5, 0.0, 0.4], e3),  # .5, 0, .4: A beats C       -> rank 1
        ("C", [0.6, 0.5, 0.0], junk),  # .6, .5, 0: A, B beat C   -> rank 2
        ("B", [0.0, 0.2, 0.9], junk),  # 0, .2, .9: C beats B     -> rank 1
    ]
    ids = [r[0] for r in rows]
    text = np.array([r[1] for r in rows], np.float32)
    image = np.array([r[2] for r in rows], np.float32)
    return text, image, ids


def test_multi_caption_hand_built_case():
    text, image, ids = hand_built_multi_caption()
    t2i, i2t, images = multi_caption_ranks(text, image, ids)
    assert images == ["A", "B", "C"]
    np.testing.assert_array_equal(t2i, [0, 1, 0, 1, 2, 1])
    # A: best caption scores 1, nothing above -> 0; B: best caption (line 3) scores 1 and
    # line 2 ties it (a tie is not above) -> 0; C: best caption .4, line 6 scores .9 -> 1
    np.testing.assert_array_equal(i2t, [0, 0, 1])
    rows = multi_caption_recall(text, image, ids, ks=(1, 2, 3))
    assert rows["Text2Image"] == {"R@1": 2 / 6, "R@2": 5 / 6, "R@3": 1.0,
                                  "meanRecall": (2 / 6 + 5 / 6 + 1.0) / 3}
    assert rows["Image2Text"]["R@1"] == 2 / 3 and rows["Image2Text"]["R@2"] == 1.0


def test_multi_caption_against_full_matrix_reference():
    # one caption per image: exactly the official protocol
    rng = np.random.default_rng(3)
    text, image = tied_embeddings(rng, 40)
    ids = [str(i) for i in range(40)]
    mc = multi_caption_recall(text, image, ids)
    assert format_table(mc) == format_table(official_recall(text, image))
    # 3 captions per image: an image's rank is that of its best-ranked caption
    text = rng.standard_normal((30, 8)).astype(np.float32)
    image = rng.standard_normal((30, 8)).astype(np.float32)
    ids = [i // 3 for i in range(30)]
    t2i, i2t, images = multi_caption_ranks(text, image, ids, chunk_size=4)
    imgs = image[::3]
    score = text @ imgs.T
    pos = np.array(ids)
    np.testing.assert_array_equal(t2i, [(score[i] > score[i, pos[i]]).sum() for i in range(30)])
    want = [min((score[:, m] > score[i, m]).sum() for i in range(30) if pos[i] == m)
            for m in range(10)]
    np.testing.assert_array_equal(i2t, want)


# ---------------------------------------------------------------------------------------------
# embeddings file: exact floats
# ---------------------------------------------------------------------------------------------


def embedding_like(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_writer_prints_floats_exactly_like_str_float32():
    rng = np.random.default_rng(0)
    special = np.float32([0, -0.0, 1, -1, 0.5, 2 ** -10, 1e-4, -1e-4, 9.9999e-5, 1.0001e-4, 0.1,
                          0.99999994, 1e-45, 3e38, 1e16, 123456789.0, 12.5, np.inf, -np.inf,
                          np.nan])
    values = np.concatenate([
        embedding_like(rng, 20, 768).ravel(),
        rng.uniform(-1, 1, 20000).astype(np.float32),
        (np.float32(10) ** rng.integers(-6, 1, 5000)).astype(np.float32)
        * (1 + rng.integers(-40, 40, 5000) * np.finfo(np.float32).eps).astype(np.float32),
        rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        special])
    values = values[:len(values) // 50 * 50].reshape(-1, 50)
    got = format_float32_rows(values, tab_after=20)
    want = [(" ".join(str(v) for v in row[:20]) + "\t" + " ".join(str(v) for v in row[20:]))
            .encode() for row in values]
    assert got == want


@pytest.mark.parametrize("block_bytes", [None, 300])
def test_reader_parses_like_float_then_float32(tmp_path, monkeypatch, block_bytes):
    if block_bytes:  # many blocks: line numbering and row placement across blocks
        monkeypatch.setattr(eio, "READ_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    forms = ["%.9g", "%.17g", "%.3f", "%.1e", "%+.6f", "%.15f", "%.16g", "%g", "%.0f"]
    toks = []
    for i in range(40 * 8):
        v = rng.standard_normal() * 10.0 ** rng.integers(-6, 4)
        s = forms[i % len(forms)] % v
        if i % 9 == 8:
            s += "."  # '12.'
        elif s.startswith("0.") and i % 5 == 0:
            s = s[1:]  # '.25'
        toks.append(s)
    toks[:4] = ["0", "-0.0", "5.", ".5"]
    lines = [" ".join(toks[8 * i:8 * i + 4]) + "\t" + " ".join(toks[8 * i + 4:8 * i + 8])
             + f"\t{i + 1}\n" for i in range(40)]
    path = tmp_path / "e.out"
    path.write_text("".join(lines))
    emb = read_embeddings(path)
    want = np.array([float(t) for t in toks]).astype(np.float32).reshape(40, 8)
    np.testing.assert_array_equal(emb.text, want[:, :4])
    np.testing.assert_array_equal(emb.image, want[:, 4:])
    assert np.array_equal(np.signbit(emb.text), np.signbit(want[:, :4]))  # -0.0 stays -0.0
    np.testing.assert_array_equal(emb.line_numbers, np.arange(1, 41))
    assert emb.source == "text" and not emb.has_official_ids


def test_official_layout_negatives_through_the_vectorised_parser(tmp_path, monkeypatch):
    # the official 9-digit layout: the SWAR parser alone must give float()'s values, signs
    # (-0.0 too) and the line numbers (the id column stays out of the float parse)
    def no_c_parser(*args):
        raise AssertionError("the official layout must not need np.loadtxt")

    monkeypatch.setattr(eio, "_parse_block_c", no_c_parser)
    monkeypatch.setattr(eio, "READ_BLOCK_BYTES", 4096)  # many blocks
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((300, 32)) * 0.05).astype(np.float32)
    values[::7, 3] = -0.0
    values[::11, 5] = 0.0
    values[1, :4] = [-1e-5, 2.5e-6, -0.5, 1.0]  # a few tokens outside "[-]0.ddd"
    toks = [[str(v) for v in row] for row in values]
    ids = rng.integers(1, 10 ** 6, 300)
    path = tmp_path / "e.out"
    path.write_text("".join(" ".join(t[:16]) + "\t" + " ".join(t[16:]) + f"\t{i}\n"
                            for t, i in zip(toks, ids)))
    emb = read_embeddings(path)
    want = np.array([[float(x) for x in t] for t in toks]).astype(np.float32)
    got = np.hstack([emb.text, emb.image])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # signs included
    assert np.signbit(got[::7, 3]).all() and not np.signbit(got[::11, 5]).any()
    assert (got < 0).sum() > 0.4 * got.size
    np.testing.assert_array_equal(emb.line_numbers, ids)


def test_write_then_read_round_trips_and_leaves_no_temp_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    text, image = embedding_like(rng, 70, 32), embedding_like(rng, 70, 32)
    text[3, :4] = [1e-5, -2.5e-7, 0.0, 1.0]  # printed as 1e-05, -2.5e-07, 0.0, 1.0
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image, sidecar=False)

    def no_line_path(*args):
        raise AssertionError("a file in the canonical layout should take the vectorised path")

    monkeypatch.setattr(eio, "_parse_block_lines", no_line_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.out"]
    emb = read_embeddings(out)
    np.testing.assert_array_equal(emb.text, text)
    np.testing.assert_array_equal(emb.image, image)
    np.testing.assert_array_equal(emb.line_numbers, np.arange(1, 71))
    first = out.read_text().split("\n")[0].split("\t")
    assert first[0] == " ".join(str(v) for v in text[0]) and first[2] == "1"


def test_layout_variants_are_accepted(tmp_path):
    # BOM, double spaces, exponents, '+', trailing space, CRLF, no final newline
    p = tmp_path / "a.out"
    p.write_bytes(b"\xef\xbb\xbf0.5  -0.25\t1e-05 2.0\t1\r\n0.125 1\t-3E2 +4 \t2")
    emb = read_embeddings(p)
    np.testing.assert_array_equal(emb.text, np.float32([[0.5, -0.25], [0.125, 1]]))
    np.testing.assert_array_equal(emb.image, np.float32([[1e-05, 2.0], [-300, 4]]))
    np.testing.assert_array_equal(emb.line_numbers, [1, 2])


@pytest.mark.parametrize("content,line,problem", [
    ("1 2\t3 4\t1\n5 6\t7 8\n", 2, "expected 3 tab-separated columns"),
    ("1 2\t3 4\t1\n5 6\t7 8\t1\n5 6 7\t7 8 9\t1\n", 3, "column 1 (text embedding) has 3 floats"),
    ("1 2\t3 4\t1\n5 6\t7\t1\n", 2, "column 2 (image embedding) has 1 floats, expected 2"),
    ("1 2\t3 4\t1\n5 6\t7 abc\t1\n", 2, "column 2 value 2: 'abc' is not a number"),
    ("1 2\t3 4\t1\n5 nan\t7 8\t1\n", 2, "column 1 value 2: 'nan' is not a finite number"),
    ("1 2\t3 4\t1\n5 6\t7 8\tx\n", 2, "column 3 must be an integer"),
    ("1 2\t3 4\t1\n\n5 6\t7 8\t1\n", 2, "empty line"),
    ("1 2 3\t3 4\t1\n", 1, "text embedding has 3 floats but image embedding has 2"),
    ("", 1, "empty file"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, line, problem):
    p = tmp_path / "bad.out"
    p.write_text(content)
    with pytest.raises(EmbeddingFormatError) as err:
        read_embeddings(p)
    assert str(err.value).startswith(f"{p}:{line}: ")
    assert problem in str(err.value)


def test_malformed_line_deep_in_a_multi_block_file(tmp_path, monkeypatch):
    monkeypatch.setattr(eio, "READ_BLOCK_BYTES", 256)
    lines = ["0.1 0.2 0.3\t0.4 0.5 0.6\t%d" % i for i in range(1, 301)]
    lines[236] = "0.1 0.2 0.3\t0.4 0.5 0.6 0.7\t237"
    p = tmp_path / "bad.out"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(EmbeddingFormatError, match=rf"^{p}:237: column 2 \(image embedding\)"):
        read_embeddings(p)


# ---------------------------------------------------------------------------------------------
# sidecar
# ---------------------------------------------------------------------------------------------


def test_sidecar_is_used_and_a_stale_one_is_ignored(tmp_path):
    rng = np.random.default_rng(4)
    text, image = embedding_like(rng, 30, 16), embedding_like(rng, 30, 16)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image)  # sidecar=True by default
    assert (tmp_path / "emb.out.npz").is_file() and sidecar_path(out) == str(out) + ".npz"
    emb = read_embeddings(out)
    assert emb.source == "sidecar"
    np.testing.assert_array_equal(emb.text, text)
    np.testing.assert_array_equal(emb.line_numbers, np.arange(1, 31))
    assert read_embeddings(out, use_sidecar=False).source == "text"

    # rewrite the text file in place with the same size (another tool's output): sidecar is stale
    data = bytearray(out.read_bytes())
    i = data.index(b".") + 1
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    out.write_bytes(bytes(data))
    with pytest.warns(StaleSidecarWarning, match="stale"):
        emb = read_embeddings(out)
    assert emb.source == "text" and not np.array_equal(emb.text, text)


def test_rewriting_without_sidecar_removes_the_old_one(tmp_path):
    rng = np.random.default_rng(6)
    out = tmp_path / "emb.out"
    write_embeddings(out, embedding_like(rng, 5, 4), embedding_like(rng, 5, 4))
    write_embeddings(out, embedding_like(rng, 5, 4), embedding_like(rng, 5, 4), sidecar=False)
    assert not (tmp_path / "emb.out.npz").exists()


def test_corrupt_sidecar_falls_back_to_text(tmp_path):
    out = tmp_path / "emb.out"
    write_embeddings(out, np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))
    (tmp_path / "emb.out.npz").write_bytes(b"not a zip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = read_embeddings(out)
    assert emb.source == "text" and any(issubclass(w.category, StaleSidecarWarning) for w in caught)


# ---------------------------------------------------------------------------------------------
# the official run's own output (../shared)
# ---------------------------------------------------------------------------------------------


def test_official_golden_output_parses_and_evaluates():
    path = need_shared("golden", "official_set1.out")
    emb = read_embeddings(path, use_sidecar=False)
    assert emb.text.shape == (23, 768) and emb.image.shape == (23, 768)
    assert emb.has_official_ids
    want_text, want_image = [], []
    with open(path) as f:  # the official reader: float() per value, then float32
        for line in f:
            t, i, _ = line.strip("\n").split("\t")
            want_text.append([float(x) for x in t.split(" ")])
            want_image.append([float(x) for x in i.split(" ")])
    np.testing.assert_array_equal(emb.text, np.array(want_text, np.float32))
    np.testing.assert_array_equal(emb.image, np.array(want_image, np.float32))
    np.testing.assert_allclose(np.linalg.norm(emb.text, axis=1), 1, atol=1e-5)
    assert format_table(official_recall(emb.text, emb.image)) == reference_table(emb.text,
                                                                                 emb.image)
    # our writer reproduces the official text byte for byte
    official_lines = path.read_bytes().split(b"\n")[:-1]
    rows = format_float32_rows(np.concatenate([emb.text, emb.image], 1), tab_after=768)
    assert [r + b"\t1" for r in rows] == official_lines
