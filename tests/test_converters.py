"""Converters from the published caption sets to the official TSV (ernievil2.datasets)
and their CLI (tools/build_tsv.py), on tiny synthetic inputs and the shared Flickr8k-CN."""

import base64
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
from conftest import ROOT, need_shared

from ernievil2 import datasets as cv
from ernievil2.data.tsv import iter_records, record_image_bytes

_spec = importlib.util.spec_from_file_location("build_tsv", ROOT / "tools" / "build_tsv.py")
build_tsv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_tsv)


def image_bytes(seed, ext=".png", h=12, w=16):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def put_image(path, seed, ext=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(seed, ext or path.suffix, **kw)
    path.write_bytes(data)
    return data


def read_lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    assert text.endswith("\n") and "\r" not in text
    return [line.split("\t") for line in text[:-1].split("\n")]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_quiet(records, out, **kw):
    return cv.write_pairs_tsv(records, out, progress=False, **kw)


def leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.fixture
def folder(tmp_path):
    """images/a.png, images/sub/b.jpg and a 2-column caption TSV with a header."""
    images = tmp_path / "images"
    data = {"a": put_image(images / "a.png", 1), "sub/b": put_image(images / "sub" / "b.jpg", 2)}
    caps = write(tmp_path / "caps.tsv", "image_file\tcaption\na.png\t红色的圆\na.png\ta red circle\n"
                                        "\nsub/b.jpg\t蓝色方块\n")
    return images, caps, data


# ---------------------------------------------------------------------------------------------
# folder


def test_folder_tsv_two_columns_with_header(folder, tmp_path):
    images, caps, data = folder
    result = cv.parse_folder(caps, str(images))
    out = tmp_path / "out" / "pairs.tsv"  # the parent folder is created
    stats = write_quiet(result.records, out)
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["红色的圆", "a"], ["a red circle", "a"], ["蓝色方块", "sub/b"]]
    assert all(len(l) == 3 for l in lines)
    assert [base64.b64decode(l[2]) for l in lines] == [data["a"], data["a"], data["sub/b"]]
    assert (stats.lines, stats.images, stats.records, stats.sanitised) == (3, 2, 3, 0)
    assert leftovers(out.parent) == []


def test_folder_tsv_three_columns_one_per_image_and_project_reader(folder, tmp_path):
    images, _, data = folder
    caps = write(tmp_path / "c3.tsv", "a.png\timgA\tfirst\nsub/b.jpg\timgB\tonly\na.png\timgA\tsecond\n")
    out = tmp_path / "one.tsv"
    stats = write_quiet(cv.parse_folder(caps, str(images)).records, out, one_per_image=True)
    assert [l[:2] for l in read_lines(out)] == [["first", "imgA"], ["only", "imgB"]]
    assert (stats.lines, stats.extra_captions) == (2, 1)
    # the project's own strict reader accepts the output and gets the original bytes back
    records = list(iter_records(out))
    assert [r.image_id for r in records] == ["imgA", "imgB"]
    assert record_image_bytes(out, records[1]) == data["sub/b"]


def test_folder_tsv_three_columns_rejects_a_short_line(folder, tmp_path):
    images, _, _ = folder
    caps = write(tmp_path / "bad.tsv", "a.png\timgA\tfirst\nsub/b.jpg\tno id\n")
    with pytest.raises(cv.DataError, match=r"bad\.tsv:2: expected 3 tab-separated columns"):
        cv.parse_folder(caps, str(images))


def test_folder_coco_json_groups_by_image(folder, tmp_path):
    images, _, data = folder
    coco = {"images": [{"id": 7, "file_name": "sub/b.jpg"}, {"id": 3, "file_name": "a.png"},
                       {"id": 9, "file_name": "unused.png"}],
            "annotations": [{"image_id": 3, "caption": "a1"}, {"image_id": 7, "caption": "b1"},
                            {"image_id": 3, "caption": "a2"}]}
    caps = write(tmp_path / "captions_val2014.json", json.dumps(coco))
    result = cv.parse_folder(caps, str(images))
    assert any("1 image(s)" in n for n in result.notes)  # image 9 has no caption
    out = tmp_path / "coco.tsv"
    write_quiet(result.records, out)
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["b1", "7"], ["a1", "3"], ["a2", "3"]]
    assert base64.b64decode(lines[0][2]) == data["sub/b"]


def test_folder_tsv_header_with_other_columns_is_an_error(folder, tmp_path):
    images, _, _ = folder
    caps = write(tmp_path / "h.tsv", "image_file\timage_id\tlang\tcaption\na.png\ta\tzh\t圆\n")
    with pytest.raises(cv.DataError, match=r"h\.tsv:1: the header names 4 columns"):
        cv.parse_folder(caps, str(images))


def test_coco_json_annotation_for_unknown_image(tmp_path):
    caps = write(tmp_path / "c.json", json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(cv.ConversionError, match=r"c\.json: annotations entry 1: image_id 1 is not in"):
        cv.parse_folder(caps, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# writer behaviour


def test_tab_and_newline_in_caption_are_replaced_and_counted(folder, tmp_path):
    images, _, _ = folder
    caps = write(tmp_path / "tabs.tsv", "a.png\tleft\tright\nsub/b.jpg\tplain\n")
    records = cv.parse_folder(caps, str(images), columns="2").records
    records.append(cv.PairRecord("two\nlines\r\n", "c", str(images / "a.png"), "mem", "caption line 9"))
    records.append(cv.PairRecord(" \n\t ", "d", str(images / "a.png"), "mem", "caption line 10"))
    out = tmp_path / "o.tsv"
    stats = write_quiet(records, out)
    assert [l[0] for l in read_lines(out)] == ["left right", "plain", "two lines"]
    assert (stats.sanitised, stats.empty_captions, stats.lines) == (2, 1, 3)


def test_missing_image_names_file_and_line_and_leaves_no_output(folder, tmp_path):
    images, _, _ = folder
    caps = write(tmp_path / "caps.tsv", "a.png\tok\nnope.png\tgone\na.png\tok again\n")
    out = tmp_path / "o.tsv"
    with pytest.raises(cv.MissingImageError) as e:
        write_quiet(cv.parse_folder(caps, str(images)).records, out)
    msg = str(e.value)
    assert msg.startswith(f"{caps}: image '") and "nope.png' not found (caption line 2)" in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_run_keeps_an_existing_output_intact(folder, tmp_path):
    images, _, _ = folder
    out = tmp_path / "o.tsv"
    out.write_text("previous\n", encoding="utf-8")
    caps = write(tmp_path / "caps.tsv", "a.png\tok\nnope.png\tgone\n")
    with pytest.raises(cv.MissingImageError):
        write_quiet(cv.parse_folder(caps, str(images)).records, out)
    assert out.read_text(encoding="utf-8") == "previous\n" and leftovers(tmp_path) == []


def test_skip_missing_counts_lines_and_images(folder, tmp_path):
    images, _, _ = folder
    (images / "junk.png").write_bytes(b"this is not an image")
    caps = write(tmp_path / "caps.tsv", "a.png\tok\nnope.png\tgone 1\nnope.png\tgone 2\njunk.png\tbad\n"
                                        "sub/b.jpg\tok 2\n")
    out = tmp_path / "o.tsv"
    stats = write_quiet(cv.parse_folder(caps, str(images)).records, out, skip_missing=True)
    assert [l[0] for l in read_lines(out)] == ["ok", "ok 2"]
    assert (stats.skipped_lines, stats.bad_images, stats.lines) == (3, 2, 2)
    assert "nope.png (not found)" in stats.first_bad[0] and "junk.png (unreadable" in stats.first_bad[1]
    assert "skipped 3 line(s) of 2 missing/unreadable image(s)" in stats.summary()


def test_unreadable_image_is_an_error_by_default(folder, tmp_path):
    images, _, _ = folder
    (images / "empty.jpg").write_bytes(b"")
    caps = write(tmp_path / "caps.tsv", "empty.jpg\tx\n")
    with pytest.raises(cv.MissingImageError, match=r"empty\.jpg' unreadable: empty file \(caption line 1\)"):
        write_quiet(cv.parse_folder(caps, str(images)).records, tmp_path / "o.tsv")
    assert not (tmp_path / "o.tsv").exists()


def test_nothing_written_is_an_error(folder, tmp_path):
    images, _, _ = folder
    caps = write(tmp_path / "caps.tsv", "nope.png\tgone\n")
    with pytest.raises(cv.ConversionError, match="nothing to write"):
        write_quiet(cv.parse_folder(caps, str(images)).records, tmp_path / "o.tsv", skip_missing=True)
    assert not (tmp_path / "o.tsv").exists()


def test_tags_from_file_fill_the_fourth_column(folder, tmp_path):
    images, caps, _ = folder
    tags = cv.load_tags(write(tmp_path / "tags.tsv", "image_id\ttags\na\tcircle  red\n"))
    out = tmp_path / "o.tsv"
    stats = write_quiet(cv.parse_folder(caps, str(images)).records, out, tags=tags)
    lines = read_lines(out)
    assert [l[1] for l in lines] == ["a", "a", "sub/b"]
    assert [l[3] for l in lines] == ["circle red", "circle red", ""]  # absent id -> empty column
    assert (stats.tags_filled, stats.tags_missing) == (2, 1)
    assert [r.tags for r in iter_records(out)] == ["circle red", "circle red", ""]


def test_tags_file_in_coco_cn_whitespace_layout_and_errors(tmp_path):
    assert cv.load_tags(write(tmp_path / "t.txt", "COCO_val2014_000000000001 狗 草地\n")) == \
        {"COCO_val2014_000000000001": "狗 草地"}
    with pytest.raises(cv.DataError, match=r"t2\.txt:2: image id 'x' repeated \(first on line 1\)"):
        cv.load_tags(write(tmp_path / "t2.txt", "x\ta\nx\tb\n"))


def test_tags_that_match_no_image_are_an_error(folder, tmp_path):
    images, caps, _ = folder
    with pytest.raises(cv.ConversionError, match="no image id of the data is in the tags table"):
        write_quiet(cv.parse_folder(caps, str(images)).records, tmp_path / "o.tsv", tags={"zzz": "t"})
    assert not (tmp_path / "o.tsv").exists()


def test_label_gives_a_fifth_column_after_an_empty_tags_column(folder, tmp_path):
    images, _, _ = folder
    records = [cv.PairRecord("圆", "a", str(images / "a.png"), "mem", "caption line 1", label="circle")]
    out = tmp_path / "o.tsv"
    write_quiet(records, out)
    assert [l[3:] for l in read_lines(out)] == [["", "circle"]]
    assert [(r.tags, r.label) for r in iter_records(out)] == [("", "circle")]


def test_max_side_shrinks_large_images_only(tmp_path):
    big = put_image(tmp_path / "big.png", 3, h=40, w=100)
    small = put_image(tmp_path / "small.png", 4, h=10, w=20)
    records = [cv.PairRecord("big", "big", str(tmp_path / "big.png"), "mem", "caption line 1"),
               cv.PairRecord("small", "small", str(tmp_path / "small.png"), "mem", "caption line 2")]
    out = tmp_path / "o.tsv"
    stats = write_quiet(records, out, max_side=50)
    lines = read_lines(out)
    shrunk = base64.b64decode(lines[0][2])
    assert shrunk[:3] == b"\xff\xd8\xff" and shrunk != big
    assert cv2.imdecode(np.frombuffer(shrunk, np.uint8), cv2.IMREAD_COLOR).shape == (20, 50, 3)
    assert base64.b64decode(lines[1][2]) == small  # fits: original bytes kept
    assert stats.resized == 1


def test_max_images_keeps_all_captions_of_the_first_images(folder, tmp_path):
    images, caps, _ = folder
    stats = write_quiet(cv.parse_folder(caps, str(images)).records, tmp_path / "o.tsv", max_images=1)
    assert [l[1] for l in read_lines(tmp_path / "o.tsv")] == ["a", "a"]
    assert stats.beyond_limit == 1


# ---------------------------------------------------------------------------------------------
# COCO-CN


def test_coco_cn_split_with_2014_and_2017_layouts(tmp_path):
    ccn = tmp_path / "coco-cn-version1805v1.1"
    coco = tmp_path / "coco"
    v1 = put_image(coco / "val2014" / "COCO_val2014_000000000042.jpg", 5)
    t1 = put_image(coco / "train2017" / "000000000007.jpg", 6)  # only the 2017 copy exists
    write(ccn / "coco-cn_test.txt", "COCO_val2014_000000000042\nCOCO_train2014_000000000007\n"
                                    "COCO_val2014_000000000099\n")
    write(ccn / "imageid.human-written-caption.txt",
          "COCO_train2014_000000000007#0\t两只狗\nCOCO_val2014_000000000042#0\t一个人\n"
          "COCO_val2014_000000000555#0\t不在测试集\nCOCO_val2014_000000000042#1\t一个男人\n")
    out = tmp_path / "coco_cn_test.tsv"
    assert build_tsv.main(["coco-cn", str(ccn), str(coco), str(out), "--split", "test", "--no-progress"]) == 0
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["一个人", "COCO_val2014_000000000042"],
                                      ["一个男人", "COCO_val2014_000000000042"],
                                      ["两只狗", "COCO_train2014_000000000007"]]
    assert [base64.b64decode(l[2]) for l in lines] == [v1, v1, t1]
    result = cv.parse_coco_cn(str(ccn / "imageid.human-written-caption.txt"), [str(coco)],
                              str(ccn / "coco-cn_test.txt"))
    assert any("COCO_val2014_000000000099" in n for n in result.notes)


def test_coco_cn_manually_translated_lines_have_no_tab_and_two_hashes(tmp_path):
    # The real imageid.manually-translated-caption.txt: 'ID#zhm#N sentence' (a space, no tab).
    ccn = tmp_path / "coco-cn-version1805v1.1"
    coco = tmp_path / "coco"
    v1 = put_image(coco / "val2014" / "COCO_val2014_000000000042.jpg", 5)
    t1 = put_image(coco / "train2014" / "COCO_train2014_000000000007.jpg", 6)
    write(ccn / "coco-cn_test.txt", "COCO_val2014_000000000042\nCOCO_train2014_000000000007\n")
    write(ccn / "imageid.manually-translated-caption.txt",
          "COCO_train2014_000000000007#zhm#0 两只狗在草地上\n"
          "COCO_val2014_000000000042#zhm#0 一个人 骑着 自行车\n"
          "COCO_val2014_000000000042#zhm#1 一个男人\n")
    out = tmp_path / "coco_cn_test_mt.tsv"
    assert build_tsv.main(["coco-cn", str(ccn), str(coco), str(out), "--split", "test",
                           "--captions", "manually-translated", "--no-progress"]) == 0
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["一个人 骑着 自行车", "COCO_val2014_000000000042"],
                                      ["一个男人", "COCO_val2014_000000000042"],
                                      ["两只狗在草地上", "COCO_train2014_000000000007"]]
    assert [base64.b64decode(l[2]) for l in lines] == [v1, v1, t1]


def test_coco_cn_missing_image_names_the_2014_path_and_line(tmp_path):
    caps = write(tmp_path / "imageid.human-written-caption.txt", "COCO_val2014_000000000001#0\t猫\n")
    records = cv.parse_coco_cn(caps, [str(tmp_path / "coco")]).records
    with pytest.raises(cv.MissingImageError) as e:
        write_quiet(records, tmp_path / "o.tsv")
    assert f"{caps}: image '" in str(e.value)
    assert os.path.join("val2014", "COCO_val2014_000000000001.jpg") in str(e.value)
    assert str(e.value).endswith("not found (caption line 1)")


def test_coco_cn_bad_caption_line(tmp_path):
    caps = write(tmp_path / "c.txt", "COCO_val2014_000000000001#0\t猫\nno-hash-here\n")
    with pytest.raises(cv.DataError, match=r"c\.txt:2: expected 'IMAGE_ID#N<TAB>sentence'"):
        cv.parse_coco_cn(caps, [str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Flickr30k-CN / Flickr8k-CN


def test_detokenize_segmented():
    assert cv.detokenize_segmented("一个:m 男人:n 穿着:v T:x 恤:n  在:p 街上:s 走:v") == "一个男人穿着T恤，在街上走"
    assert cv.detokenize_segmented("两 只 狗  在 草地 上 玩耍 ") == "两只狗，在草地上玩耍"
    assert cv.detokenize_segmented("a man  NBA 球员") == "a man，NBA球员"


def test_flickr30k_cn_collection_folder(tmp_path):
    name = "flickr30kzhmbosontest"
    col = tmp_path / name
    imgs = tmp_path / "flickr30k-images"
    d1, d2 = put_image(imgs / "1000092795.jpg", 7), put_image(imgs / "10002456.jpg", 8)
    write(col / "ImageSets" / f"{name}.txt", "10002456\n1000092795\n")
    write(col / "TextData" / f"seg.{name}.caption.txt",
          "1000092795#zhm#0 两:m 个:q 年轻人:n  在:p 草地:n 上:f\n"
          "10002456#zhm#0 一个:m 工人:n\n"
          "999#zhm#0 不在:v 列表:n\n"
          "10002456#zhm#1 工人:n 在:p 工作:v\n")
    out = tmp_path / "f30k.tsv"
    assert build_tsv.main(["flickr30k-cn", str(col), str(imgs), str(out), "--no-progress"]) == 0
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["一个工人", "10002456"], ["工人在工作", "10002456"],
                                      ["两个年轻人，在草地上", "1000092795"]]
    assert [base64.b64decode(l[2]) for l in lines] == [d2, d2, d1]


def test_flickr_cn_tab_separated_file_with_jpg_ids(tmp_path):
    imgs = tmp_path / "images"
    data = put_image(imgs / "1000268201_693b08cb0e.jpg", 9)
    caps = write(tmp_path / "flickr8kzhb.caption.txt",
                 "1000268201_693b08cb0e.jpg#zhb#0\t穿着粉红色连衣裙的孩子。\n")
    result = cv.parse_flickr_cn(caps, str(imgs))  # not seg.*: text kept as is
    out = tmp_path / "o.tsv"
    write_quiet(result.records, out)
    assert read_lines(out) == [["穿着粉红色连衣裙的孩子。", "1000268201_693b08cb0e",
                                base64.b64encode(data).decode()]]


def test_flickr_cn_bad_sentence_id(tmp_path):
    caps = write(tmp_path / "seg.x.caption.txt", "1000092795#zhm#0 好\n1000092795 坏\n")
    with pytest.raises(cv.DataError, match=r"seg\.x\.caption\.txt:2: expected 'IMAGE#LANG#N caption'"):
        cv.parse_flickr_cn(caps, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# AI Challenger


def test_aic_icc_json(tmp_path):
    imgs = tmp_path / "caption_validation_images_20170910"
    da = put_image(imgs / "8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg", 10)
    db = put_image(imgs / "b96ff46ebd9c5d2f5e0bbdde7b6ad1f5a2a1e3c1.jpg", 11)
    ann = [{"url": "http://x/1.jpg", "image_id": "8f00f3d0f1008e085ab660e70dffced16a8259f6.jpg",
            "caption": ["一个人\n在路上走", "", "两个人\t在 路上\n"]},
           {"url": "http://x/2.jpg", "image_id": "b96ff46ebd9c5d2f5e0bbdde7b6ad1f5a2a1e3c1.jpg",
            "caption": ["一只狗"]}]
    path = write(tmp_path / "caption_validation_annotations_20170910.json", json.dumps(ann, ensure_ascii=False))
    out = tmp_path / "aic.tsv"
    result = cv.parse_aic_icc(path, str(imgs))
    stats = write_quiet(result.records, out)
    lines = read_lines(out)
    # Newlines are deleted (the official baseline's preprocessing); a tab still becomes a space.
    assert [l[:2] for l in lines] == [["一个人在路上走", "8f00f3d0f1008e085ab660e70dffced16a8259f6"],
                                      ["两个人 在 路上", "8f00f3d0f1008e085ab660e70dffced16a8259f6"],
                                      ["一只狗", "b96ff46ebd9c5d2f5e0bbdde7b6ad1f5a2a1e3c1"]]
    assert [base64.b64decode(l[2]) for l in lines] == [da, da, db]
    assert (stats.sanitised, stats.empty_captions) == (1, 1)
    assert any(n.startswith("2 caption(s)") and "newlines deleted" in n for n in result.notes)


def test_aic_icc_wrong_shape(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"url": "u", "caption": ["x"]}]))
    with pytest.raises(cv.ConversionError, match=r'a\.json: entry 1 needs "image_id"'):
        cv.parse_aic_icc(path, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# MUGE / Chinese-CLIP


def test_muge_pairs_and_base64_passthrough(tmp_path):
    d1, d2 = image_bytes(12, ".jpg"), image_bytes(13, ".png")
    b1 = base64.b64encode(d1).decode()
    b2_urlsafe = base64.urlsafe_b64encode(d2).decode()
    imgs = write(tmp_path / "valid_imgs.tsv", f"1076345\t{b1}\n517602\t{b2_urlsafe}\n")
    texts = write(tmp_path / "valid_texts.jsonl",
                  '{"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}\n'
                  '{"text_id": 8429, "text": "无图", "image_ids": []}\n'
                  '{"text_id": 8430, "text": "连衣裙", "image_ids": [517602]}\n')
    result = cv.parse_muge(imgs, texts)
    assert any("1 text(s)" in n for n in result.notes)
    out = tmp_path / "muge.tsv"
    stats = write_quiet(result.records, out)
    lines = read_lines(out)
    assert [l[:2] for l in lines] == [["高级感托特包斜挎", "1076345"], ["高级感托特包斜挎", "517602"],
                                      ["连衣裙", "517602"]]
    assert lines[0][2] == b1  # copied as is
    assert lines[1][2] == base64.b64encode(d2).decode()  # URL-safe alphabet mapped to the standard one
    assert (stats.lines, stats.images) == (3, 2)


def test_muge_missing_and_corrupt_images(tmp_path):
    imgs = write(tmp_path / "imgs.tsv", f"1\t{base64.b64encode(image_bytes(1)).decode()}\n2\t!!notbase64!!\n")
    texts = write(tmp_path / "texts.jsonl", '{"text_id": 1, "text": "a", "image_ids": [1]}\n'
                                            '{"text_id": 2, "text": "b", "image_ids": [3]}\n'
                                            '{"text_id": 3, "text": "c", "image_ids": [2]}\n')
    records = cv.parse_muge(imgs, texts).records
    with pytest.raises(cv.MissingImageError, match=r"texts\.jsonl: image '3' not found \(caption line 2\)"):
        write_quiet(records, tmp_path / "o.tsv")
    stats = write_quiet(records, tmp_path / "o.tsv", skip_missing=True)
    assert (stats.lines, stats.skipped_lines, stats.bad_images) == (1, 2, 2)
    assert "corrupt base64" in stats.first_bad[1]


def test_muge_repeated_image_id(tmp_path):
    imgs = write(tmp_path / "imgs.tsv", "1\tAAAA\n1\tAAAA\n")
    with pytest.raises(cv.DataError, match=r"imgs\.tsv:2: image id '1' repeated \(first on line 1\)"):
        cv.index_base64_tsv(imgs)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_folder_with_tags_and_one_per_image(folder, tmp_path, capsys):
    images, caps, _ = folder
    tags = write(tmp_path / "tags.tsv", "a\tred circle\nsub/b\tblue square\n")
    out = tmp_path / "o.tsv"
    rc = build_tsv.main(["folder", str(images), caps, str(out), "--one-per-image", "--tags-from", tags,
                         "--no-progress"])
    assert rc == 0
    assert [(l[0], l[1], l[3]) for l in read_lines(out)] == [("红色的圆", "a", "red circle"),
                                                            ("蓝色方块", "sub/b", "blue square")]
    assert "wrote 2 lines (2 images)" in capsys.readouterr().out


def test_cli_missing_image_exit_code_and_message(folder, tmp_path, capsys):
    images, _, _ = folder
    caps = write(tmp_path / "caps.tsv", "a.png\tok\nnope.png\tgone\n")
    out = tmp_path / "o.tsv"
    assert build_tsv.main(["folder", str(images), caps, str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "nope.png' not found (caption line 2)" in err
    assert not out.exists()
    assert build_tsv.main(["folder", str(images), caps, str(out), "--no-progress", "--skip-missing"]) == 0
    assert "skipped 1 line(s) of 1 missing/unreadable image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("command, words", [
    ("folder", "image_file<TAB>caption"), ("coco-cn", "imageid.human-written-caption.txt"),
    ("flickr30k-cn", "#zhm#0"), ("aic-icc", '"caption": [5 sentences]'), ("muge", '"image_ids"'),
    ("flickr8k-cn", "captions_{train,val}.tsv")])
def test_cli_help_describes_the_input_format(command, words, capsys):
    with pytest.raises(SystemExit) as e:
        build_tsv.main([command, "--help"])
    assert e.value.code == 0
    assert words in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the shared Flickr8k-CN reference folder


@pytest.mark.shared
def test_flickr8k_cn_val_zh_from_shared(tmp_path, capsys):
    data_dir = need_shared("data", "flickr8k_cn")
    rc = build_tsv.main(["flickr8k-cn", str(data_dir), str(tmp_path), "--lang", "zh", "--splits", "val",
                         "--no-progress"])
    assert rc == 0
    out = tmp_path / "flickr8k_cn_val_zh.tsv"
    lines = read_lines(out)
    assert len(lines) == 565 and all(len(l) == 3 for l in lines)  # 113 images x 5 zh captions
    ids = [l[1] for l in lines]
    assert len(set(ids)) == 113 and all(ids.count(i) == 5 for i in set(ids))
    decoded = {}
    for l in lines:
        if l[1] not in decoded:
            raw = base64.b64decode(l[2])
            assert raw == (data_dir / "images" / f"{l[1]}.jpg").read_bytes()
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.ndim == 3
            decoded[l[1]] = img.shape
    assert len(decoded) == 113
    assert "wrote 565 lines (113 images)" in capsys.readouterr().out
    assert sum(1 for _ in iter_records(out)) == 565
