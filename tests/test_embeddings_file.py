"""The embeddings file (ernievil2.embeddings): whole-file sidecar digest, 17-digit files, blank
lines at the end, float32 overflow; and the one id-list / TSV line reader (ernievil2.data.tsv)."""
import hashlib
import json
import sys
import warnings

import numpy as np
import pytest
from conftest import ROOT

from ernievil2.data.tsv import (
    DataError,
    image_ids_from_tsv,
    index_lines,
    read_column,
    read_id_list,
    read_line_at,
)
from ernievil2.embeddings import (
    EmbeddingFormatError,
    StaleSidecarWarning,
    read_embeddings,
    sidecar_path,
    write_embeddings,
)
from ernievil2.embeddings import parser as emb_parser

sys.path.insert(0, str(ROOT))
import eval_retri  # noqa: E402
from test_eval_retri_cli import embeddings  # noqa: E402


def parse_by_float(data: bytes):
    """Reference parse: float() per value, then float32 (what the official reader does)."""
    text, image = [], []
    for line in data.decode().splitlines():
        t, i, _ = line.split("\t")
        text.append([float(x) for x in t.split()])
        image.append([float(x) for x in i.split()])
    return np.array(text, np.float64).astype(np.float32), np.array(image).astype(np.float32)


def test_same_size_edit_in_the_middle_makes_the_sidecar_stale(tmp_path, capsys):
    text, image = embeddings(200, 64, seed=3)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image)  # with sidecar
    data = out.read_bytes()
    assert len(data) > 4 * 64 * 1024  # the edit below is far from both ends of the file
    lines = data.split(b"\n")
    for k in range(80, 120, 2):  # swap the images of neighbouring lines: same size
        (t0, i0, n0), (t1, i1, n1) = lines[k].split(b"\t"), lines[k + 1].split(b"\t")
        lines[k], lines[k + 1] = b"\t".join([t0, i1, n0]), b"\t".join([t1, i0, n1])
    edited = b"\n".join(lines)
    assert len(edited) == len(data) and edited != data
    out.write_bytes(edited)

    want_text, want_image = parse_by_float(edited)
    with pytest.warns(StaleSidecarWarning, match="stale sidecar"):
        emb = read_embeddings(out)
    assert emb.source == "text"
    np.testing.assert_array_equal(emb.text, want_text)
    np.testing.assert_array_equal(emb.image, want_image)

    json_path = tmp_path / "r.json"
    assert eval_retri.main([str(out), "--json", str(json_path)]) == 0
    _, err = capsys.readouterr()
    assert "stale sidecar" in err
    result = json.loads(json_path.read_text())
    assert result["loaded_from"] == "text"
    # the edited rows score differently: the stale arrays would give another table
    assert eval_retri.main([str(out), "--no-sidecar"]) == 0
    edited_table = capsys.readouterr()[0]
    write_embeddings(tmp_path / "orig.out", text, image, sidecar=False)
    assert eval_retri.main([str(tmp_path / "orig.out")]) == 0
    assert capsys.readouterr()[0] != edited_table


def test_fresh_sidecar_is_used_and_matches_the_text(tmp_path):
    text, image = embeddings(30, 16, seed=1)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb = read_embeddings(out)
    assert emb.source == "sidecar"
    parsed = read_embeddings(out, use_sidecar=False)
    assert emb.digest == hashlib.sha256(out.read_bytes()).hexdigest()
    np.testing.assert_array_equal(emb.text, parsed.text)


def test_old_sidecar_version_is_ignored(tmp_path):
    text, image = embeddings(5, 4)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image)
    with np.load(sidecar_path(out)) as z:
        arrays = dict(z)
    arrays["version"] = np.int64(1)
    np.savez(sidecar_path(out), **arrays)
    with pytest.warns(StaleSidecarWarning, match="version 1"):
        assert read_embeddings(out).source == "text"


@pytest.mark.parametrize("block_bytes", [None, 4096])
def test_17_digit_file_parses_exactly_like_float(tmp_path, monkeypatch, block_bytes):
    if block_bytes:
        monkeypatch.setattr(emb_parser, "READ_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(5)
    values = rng.standard_normal((40, 2, 48)) * 10.0 ** rng.integers(-7, 3, (40, 2, 48))
    data = "".join(" ".join(map(repr, v[0].tolist())) + "\t" + " ".join(map(repr, v[1].tolist()))
                   + f"\t{k + 1}\n" for k, v in enumerate(values)).encode()
    assert b"e-" in data  # exponents are in the mix
    out = tmp_path / "e17.out"
    out.write_bytes(data)
    emb = read_embeddings(out)
    want_text, want_image = parse_by_float(data)
    np.testing.assert_array_equal(emb.text, want_text)
    np.testing.assert_array_equal(emb.image, want_image)
    np.testing.assert_array_equal(emb.line_numbers, np.arange(1, 41))


@pytest.mark.parametrize("block_bytes", [64, 1000, 1 << 20])
def test_lines_longer_than_a_block_bom_and_trailing_blank_lines(tmp_path, monkeypatch,
                                                                 block_bytes):
    monkeypatch.setattr(emb_parser, "READ_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(9)
    values = rng.standard_normal((25, 2, 40)).astype(np.float32)  # lines of ~800 bytes
    data = "".join(" ".join(map(str, v[0].tolist())) + "\t" + " ".join(map(str, v[1].tolist()))
                   + f"\t{k + 1}\n" for k, v in enumerate(values)).encode()
    assert min(map(len, data.splitlines())) > 64
    out = tmp_path / "long.out"
    out.write_bytes(b"\xef\xbb\xbf" + data + b"\n \n")
    emb = read_embeddings(out)
    want_text, want_image = parse_by_float(data)
    np.testing.assert_array_equal(emb.text, want_text)
    np.testing.assert_array_equal(emb.image, want_image)
    np.testing.assert_array_equal(emb.line_numbers, np.arange(1, 26))


@pytest.mark.parametrize("tail", [b"\n", b"\n\n", b"\r\n \n", b"", b"\n\t\n"])
def test_blank_lines_at_the_end_are_ignored(tmp_path, tail):
    text, image = embeddings(6, 8)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image, sidecar=False)
    out.write_bytes(out.read_bytes().rstrip(b"\n") + tail)
    emb = read_embeddings(out)
    assert emb.num_lines == 6
    np.testing.assert_array_equal(emb.text, text)


def test_blank_line_in_the_middle_is_an_error(tmp_path):
    text, image = embeddings(6, 8)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image, sidecar=False)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:3] + [b""] + lines[3:]))
    with pytest.raises(EmbeddingFormatError, match=rf"{out.name}:4: empty line"):
        read_embeddings(out)


@pytest.mark.parametrize("value, problem", [
    ("1e39", "beyond the float32 range"),
    ("-3.5e38", "beyond the float32 range"),
    ("inf", "not a finite number"),
    ("nan", "not a finite number"),
])
def test_values_beyond_float32_name_file_and_line(tmp_path, value, problem):
    text, image = embeddings(5, 8)
    out = tmp_path / "emb.out"
    write_embeddings(out, text, image, sidecar=False)
    lines = out.read_bytes().split(b"\n")
    t, i, n = lines[2].split(b"\t")
    lines[2] = b"\t".join([t, b" ".join(i.split()[:3] + [value.encode()] + i.split()[4:]), n])
    out.write_bytes(b"\n".join(lines))
    with pytest.raises(EmbeddingFormatError, match=rf"{out.name}:3: column 2 value 4: "
                                                   rf"'{value}' is {problem}"):
        read_embeddings(out)


def test_largest_float32_still_parses(tmp_path):
    out = tmp_path / "emb.out"
    out.write_bytes(b"3.4028235e38 0.5\t-3.4028235e38 0.25\t1\n")
    emb = read_embeddings(out)
    assert emb.text[0, 0] == np.finfo(np.float32).max and emb.image[0, 0] == -emb.text[0, 0]


# --- the TSV line rules, shared by every reader -------------------------------------------------

def test_index_lines_offsets_with_bom_crlf_and_trailing_blanks(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_bytes(b"\xef\xbb\xbfa\tid1\tx\r\nb\tid2\ty\n\n \n")
    rows = list(index_lines(p))
    assert [(n, raw) for n, _, raw in rows] == [(1, b"a\tid1\tx"), (2, b"b\tid2\ty")]
    with open(p, "rb") as f:
        assert [read_line_at(f, off) for _, off, _ in rows] == [raw for _, _, raw in rows]


def test_index_lines_rejects_a_blank_line_in_the_middle(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_bytes(b"a\tb\n\t \nc\td\n")
    with pytest.raises(DataError, match=r"a\.tsv:2: empty line in the middle"):
        list(read_column(p, 1))


def test_read_id_list_one_behaviour(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_bytes(b"\xef\xbb\xbf img1 \r\nimg2\nimg1\n\n")
    assert read_id_list(p) == ["img1", "img2", "img1"]  # order and repeats kept, BOM dropped
    p.write_bytes(b"img1\n\nimg2\n")
    with pytest.raises(DataError, match=r"ids\.txt:2: empty line in the middle"):
        read_id_list(p)
    p.write_bytes(b"img1\n\xff\n")
    with pytest.raises(DataError, match=r"ids\.txt:2: invalid UTF-8"):
        read_id_list(p)
    p.write_bytes(b"\n \n")
    with pytest.raises(DataError, match=r"ids\.txt: no ids"):
        read_id_list(p)


def test_image_ids_from_tsv_follows_line_numbers(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_bytes(b"\xef\xbb\xbfcap a\tA\tQUJD\ncap b\tB\tQUJD\r\ncap c\tA\tQUJD\n\n")
    assert image_ids_from_tsv(p, None, 3) == ["A", "B", "A"]
    assert image_ids_from_tsv(p, np.array([3, 1, 2, 2]), 4) == ["A", "A", "B", "B"]
    with pytest.raises(DataError, match="has 3 lines but the embeddings file has 2"):
        image_ids_from_tsv(p, None, 2)
    with pytest.raises(DataError, match=r"t\.tsv:4: is not a data line"):
        image_ids_from_tsv(p, np.array([1, 4]), 2)
