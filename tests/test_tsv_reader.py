"""The streaming TSV reader: parsing, sharding, bad lines, fast counts (ernievil2.data.tsv)."""

import base64
import pickle

import cv2
import numpy as np
import pytest
from conftest import need_shared

from ernievil2.data import tsv
from ernievil2.data.tsv import (
    DataError,
    Record,
    SkipReport,
    count_lines,
    decode_b64,
    image_rank,
    iter_records,
    read_column,
    record_image_bytes,
)


def png_b64(seed: int, h: int = 6, w: int = 9) -> str:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return base64.b64encode(buf.tobytes()).decode("ascii")


def good_line(i: int) -> str:
    return f"caption {i}\timg{i}\t{png_b64(i)}"


def write_tsv(tmp_path, lines, name="data.tsv", end=b"\n", prefix=b""):
    """Write lines (str or bytes), each followed by `end`; returns the path as a str."""
    path = tmp_path / name
    body = b"".join((l.encode("utf-8") if isinstance(l, str) else l) + end for l in lines)
    path.write_bytes(prefix + body)
    return str(path)


def line_nos(records):
    return [r.line_no for r in records]


# ---------------------------------------------------------------------------------------------
# good input


def test_parses_the_three_official_columns(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), good_line(2)])
    records = list(iter_records(path))
    assert records[0] == Record(1, "caption 1", "img1", png_b64(1), None, None)
    assert line_nos(records) == [1, 2]
    img = cv2.imdecode(np.frombuffer(record_image_bytes(path, records[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (6, 9, 3)


def test_bom_crlf_and_trailing_empty_lines_are_accepted(tmp_path):
    lines = ["  猫 在 桌上 \t a1 \t" + png_b64(1), good_line(2), good_line(3), "", "  "]
    path = write_tsv(tmp_path, lines, end=b"\r\n", prefix=tsv.UTF8_BOM)
    records = list(iter_records(path))
    assert line_nos(records) == [1, 2, 3]
    assert records[0].text == "猫 在 桌上"  # no BOM, surrounding spaces stripped like the official strip()
    assert records[0].image_id == "a1"
    assert all("\r" not in r.image_b64 for r in records)
    assert decode_b64(records[2].image_b64) == base64.b64decode(png_b64(3))
    assert count_lines(path) == 3


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(good_line(1) + "\n" + good_line(2), encoding="utf-8")
    assert line_nos(iter_records(path)) == [1, 2]
    assert count_lines(path) == 2


def test_optional_tags_and_label_columns(tmp_path):
    b = png_b64(0)
    path = write_tsv(tmp_path, [
        f"a cat\tid1\t{b}\tcat, sofa",
        f"a dog\tid2\t{b}\t",  # tags column present but empty
        f"a car\tid3\t{b}\tcar road\tvehicle",
        f"a cup\tid4\t{b}",
    ])
    r = list(iter_records(path))
    assert [(x.tags, x.label) for x in r] == [
        ("cat, sofa", None), ("", None), ("car road", "vehicle"), (None, None)
    ]
    assert all(x.image_b64 == b for x in r)


def test_two_column_files_need_min_columns_2(tmp_path):
    path = write_tsv(tmp_path, [f"text only\t{png_b64(0)}"])
    with pytest.raises(DataError, match=r":1: expected 3 to 5"):
        list(iter_records(path))
    (r,) = iter_records(path, min_columns=2)
    assert (r.text, r.image_id, r.image_b64) == ("text only", "", png_b64(0))


# ---------------------------------------------------------------------------------------------
# sharding


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_covers_every_line_once_and_is_deterministic(tmp_path, world_size):
    n = 10
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, n + 1)] + [""])
    seen = []
    for rank in range(world_size):
        got = line_nos(iter_records(path, rank, world_size))
        assert got == line_nos(iter_records(path, rank, world_size))  # same again
        assert all((i - 1) % world_size == rank for i in got)
        assert len(got) == len(range(rank + 1, count_lines(path) + 1, world_size))
        seen += got
    assert sorted(seen) == list(range(1, n + 1))


def test_sharding_counts_bad_lines_and_each_is_reported_by_one_rank(tmp_path):
    lines = [good_line(i) for i in range(1, 8)]
    lines[3] = "only one column"  # line 4
    lines[4] = ""  # line 5, a blank in the middle
    path = write_tsv(tmp_path, lines)
    reports, seen = [], []
    for rank in range(3):
        report = SkipReport()
        seen += line_nos(iter_records(path, rank, 3, skip_bad_lines=True, report=report))
        reports.append(report.line_numbers)
    assert sorted(seen) == [1, 2, 3, 6, 7]  # numbering is not shifted by the bad lines
    assert reports == [[4], [5], []]  # line 4 -> rank 0, line 5 -> rank 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_image_sharding_keeps_every_line_of_an_image_on_one_rank(tmp_path, world_size):
    # 5 captions a photo, one photo's base64 without its "=" padding, and lines that do not
    # parse (their owner is round-robin, as with shard="line"), one of them with a good image
    photos = {k: png_b64(k) for k in range(6)}
    lines = [f"caption {n}\tp{k}\t{photos[k]}" for k in range(6) for n in range(5)]
    lines[7] = lines[7].rstrip("=")  # line 8, photo 1
    lines[11] = "only one column"  # line 12
    lines[13] = ""  # line 14, a blank in the middle
    lines[16] = f"\tp3\t{photos[3]}"  # line 17: empty text
    path = write_tsv(tmp_path, lines)
    shares, reports = [], []
    for rank in range(world_size):
        report = SkipReport()
        records = list(iter_records(path, rank, world_size, skip_bad_lines=True, report=report,
                                    shard="image"))
        assert records == list(iter_records(path, rank, world_size, skip_bad_lines=True,
                                            shard="image"))  # same again
        assert {image_rank(r.image_b64, world_size) for r in records} <= {rank}
        shares.append({r.image_id for r in records})
        reports.append(report.line_numbers)
        assert line_nos(records) == sorted(line_nos(records))  # file order
    assert sorted(n for r in reports for n in r) == [12, 14, 17]  # each bad line once
    assert all(n in reports[(n - 1) % world_size] for n in (12, 14, 17))
    assert sum(len(s) for s in shares) == 6 == len(set().union(*shares))  # each photo on one rank
    assert len({image_rank(p, world_size) for p in photos.values()}) > 1  # the ranks share work
    everything = line_nos(iter_records(path, skip_bad_lines=True))
    found = sorted(n for rank in range(world_size)
                   for n in line_nos(iter_records(path, rank, world_size, skip_bad_lines=True,
                                                  shard="image")))
    assert found == everything == [n for n in range(1, 31) if n not in (12, 14, 17)]


def test_image_sharding_with_one_process_reads_every_line(tmp_path):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 6)])
    assert line_nos(iter_records(path, shard="image")) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="shard"):
        list(iter_records(path, shard="images"))


def test_bad_rank_arguments(tmp_path):
    path = write_tsv(tmp_path, [good_line(1)])
    for rank, ws in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="rank"):
            list(iter_records(path, rank, ws))


# ---------------------------------------------------------------------------------------------
# bad input


BAD_LINES = {
    "too few columns": (b"caption\timg", "expected 3 to 5 tab-separated columns"),
    "too many columns": (b"c\ti\tQUJD\tt\tl\textra", "found 6"),
    "empty text": (b"  \timg\tQUJD", "empty text"),
    "empty image field": (b"caption\timg\t ", "empty image field"),
    "empty label": (b"caption\timg\tQUJD\ttags\t", "empty label"),
    "invalid UTF-8": (b"caf\xc3\x28\timg\tQUJD", "invalid UTF-8 at byte 3"),
    "empty line in the middle": (b"", "empty line in the middle"),
    "control characters only": ("\x00\u200b\x07 \u202e\timg\tQUJD".encode(),
                                "text (column 1) is only control or invisible characters"),
    "a tab in the caption": (f"a red\tcircle\timg2\t{png_b64(2)}".encode(),
                             "4 columns where 3 are expected: a tab inside the caption? "
                             "(column 4, not 3, holds what looks like the base64 image)"),
    "a tab in the caption of a tags file": (
        f"a\tred\tcircle\timg2\t{png_b64(2)}\tcircle".encode(),
        "6 columns where 4 are expected: a tab inside the caption? (column 5, not 3"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, kind):
    bad, problem = BAD_LINES[kind]
    path = write_tsv(tmp_path, [good_line(1), bad, good_line(3)])
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert problem in str(info.value)
    assert (info.value.path, info.value.line_no) == (path, 2)


def test_captions_with_a_word_and_tags_columns_are_not_mistaken_for_bad_lines(tmp_path):
    lines = ["\u200b\x00猫", f"x\timg\t{png_b64(1)}\t{'A' * 80}\tlabel", "_", "°"]
    lines = [line if "\t" in line else f"{line}\timg\t{png_b64(1)}" for line in lines]
    path = write_tsv(tmp_path, lines)
    assert [r.text for r in iter_records(path)] == ["\u200b\x00猫", "x", "_", "°"]


def test_corrupt_base64_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), "c\ti\tnot*base64!"])
    (_, record) = iter_records(path)  # parsing does not decode base64 ...
    with pytest.raises(DataError) as info:  # ... decoding does, naming the line
        record_image_bytes(path, record)
    assert str(info.value).startswith(f"{path}:2: corrupt base64")


def test_skip_bad_lines_reports_and_keeps_good_lines(tmp_path):
    lines = [good_line(i) for i in range(1, 10)]
    lines[1] = "no tabs here"  # 2
    lines[4] = b"\xff\xfe\timg\tQUJD"  # 5
    lines[5] = ""  # 6
    lines[7] = f"\timg8\t{png_b64(8)}"  # 8
    path = write_tsv(tmp_path, lines + [""])  # plus a trailing blank line: not reported
    report = SkipReport()
    records = list(iter_records(path, skip_bad_lines=True, report=report))
    assert line_nos(records) == [1, 3, 4, 7, 9]
    assert [r.text for r in records] == ["caption 1", "caption 3", "caption 4", "caption 7", "caption 9"]
    assert report.count == 4 and report.line_numbers == [2, 5, 6, 8]
    assert "column" in report.reasons[2] and "UTF-8" in report.reasons[5]
    assert "empty line" in report.reasons[6] and "empty text" in report.reasons[8]
    assert report.path == path
    assert report.summary().startswith(f"{path}: skipped 4 bad line(s): lines 2, 5, 6, 8;")


def test_skip_report_summary_lists_first_20_lines():
    report = SkipReport("f.tsv")
    assert not report and "no bad lines" in report.summary()
    for n in range(30, 5, -1):  # added out of order, as workers may
        report.add(DataError("f.tsv", n, f"problem {n}"))
    text = report.summary()
    assert "lines 6, 7, " in text and ", 25 (+5 more)" in text and "26" not in text.split("(+")[0]
    assert text.endswith("first: line 6: problem 6")


def test_data_error_pickles_with_its_fields():
    e = pickle.loads(pickle.dumps(DataError("a/b.tsv", 7, "bad thing")))
    assert (str(e), e.path, e.line_no, e.problem) == ("a/b.tsv:7: bad thing", "a/b.tsv", 7, "bad thing")
    assert isinstance(e, ValueError)


# ---------------------------------------------------------------------------------------------
# base64


def test_decode_b64_accepts_standard_and_unpadded():
    data = bytes(range(256)) * 3 + b"xy"  # length not a multiple of 3 -> padded encoding
    enc = base64.b64encode(data).decode()
    assert enc.endswith("=")
    assert decode_b64(enc) == data
    assert decode_b64(enc.rstrip("=")) == data  # missing padding tolerated
    assert decode_b64(enc.encode()) == data


@pytest.mark.parametrize("bad", ["", "QUJ*", "QU\nJD", "QUJDR", "-_-_", "QUJDé"])
def test_decode_b64_rejects_corrupt(bad):
    with pytest.raises(ValueError, match="corrupt base64"):
        decode_b64(bad)


# ---------------------------------------------------------------------------------------------
# count_lines / read_column


@pytest.mark.parametrize("content, expected", [
    (b"", 0),
    (b"\n\n  \r\n", 0),
    (tsv.UTF8_BOM + b"\n", 0),
    (b"a", 1),
    (b"a\n", 1),
    (b"a\r\nb\r\n", 2),
    (b"a\n\nb\n\n\n", 3),  # a middle blank line counts, trailing ones do not
    (b"a\nb \t\n \n", 2),
])
def test_count_lines(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "c.tsv"
    path.write_bytes(content)
    assert count_lines(path) == expected
    monkeypatch.setattr(tsv, "_CHUNK", 2)  # force chunk boundaries everywhere
    assert count_lines(path) == expected


def test_count_lines_agrees_with_the_reader(tmp_path, monkeypatch):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 6)] + ["", " "], end=b"\r\n")
    monkeypatch.setattr(tsv, "_CHUNK", 7)
    assert count_lines(path) == 5 == len(list(iter_records(path)))


def test_read_column(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), good_line(2), "t\t id3 \tQUJD\ttag", ""], end=b"\r\n",
                     prefix=tsv.UTF8_BOM)
    assert list(read_column(path, 1)) == ["img1", "img2", "id3"]
    assert list(read_column(path, 0)) == ["caption 1", "caption 2", "t"]
    with pytest.raises(DataError, match=r":1: no column 4"):
        list(read_column(path, 3))


def test_read_column_rejects_blank_line_in_the_middle(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), "", good_line(3)])
    with pytest.raises(DataError) as info:
        list(read_column(path, 1))
    assert str(info.value).startswith(f"{path}:2: empty line")


# ---------------------------------------------------------------------------------------------
# the real reference files


REAL_FILES = [("data", "fixtures", "muge_fixture.tsv"), ("data", "fixtures", "skimage_clip8.tsv"),
              ("golden", "set1.tsv")]


@pytest.mark.parametrize("parts", REAL_FILES, ids=lambda p: p[-1])
def test_real_reference_files_parse(parts):
    path = need_shared(*parts)
    records = list(iter_records(path))
    with open(path, "rb") as f:
        physical = sum(1 for _ in f)
    assert len(records) == count_lines(path) == physical
    assert line_nos(records) == list(range(1, physical + 1))
    assert [r.image_id for r in records] == list(read_column(path, 1))
    for r in records:
        assert r.text and r.tags is None
        img = cv2.imdecode(np.frombuffer(record_image_bytes(path, r), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.ndim == 3
