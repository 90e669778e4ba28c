"""BatchLoader: batching, worker threads, order, bounded read-ahead, errors (ernievil2.data.pipeline).

The real transforms/tokenizer are injected elsewhere; here small stand-ins keep the tests fast
and independent of those modules."""

import base64
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import need_shared

from ernievil2.data.pipeline import Batch, BatchLoader, RecordProcessingError
from ernievil2.data.tsv import DataError, image_rank

SIZE = 8


def decode_image(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cv2.imdecode could not decode the bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_transform(img: np.ndarray) -> np.ndarray:
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return (img.astype(np.float32) / 255.0).transpose(2, 0, 1)


def length_encoder(texts):
    return np.array([[len(t)] for t in texts], dtype=np.int64)


def img_b64(seed: int) -> str:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 20, 2)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg" if seed % 2 else ".png", img)
    assert ok
    return base64.b64encode(buf.tobytes()).decode("ascii")


def good_line(i: int) -> str:
    return f"text number {i}\tid{i}\t{img_b64(i)}"


def write_tsv(tmp_path, lines, name="data.tsv"):
    path = tmp_path / name
    path.write_bytes(b"".join((l.encode() if isinstance(l, str) else l) + b"\n" for l in lines))
    return str(path)


def make_loader(path, batch_size=3, **kw):
    kw.setdefault("decode_image", decode_image)
    return BatchLoader(path, batch_size, resize_transform, length_encoder, **kw)


def flatten(batches, field):
    return [x for b in batches for x in getattr(b, field)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.line_numbers, y.line_numbers)
        assert (x.image_ids, x.texts, x.tags, x.labels) == (y.image_ids, y.texts, y.tags, y.labels)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.input_ids, y.input_ids)


CORRUPT_B64 = "c\tid\t%%%notbase64"
UNDECODABLE = "c\tid\t" + base64.b64encode(b"these bytes are not an image").decode()


# ---------------------------------------------------------------------------------------------


def test_batches_hold_decoded_images_and_encoded_texts(tmp_path):
    b = img_b64(0)
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 6)]
                     + [f"tagged\tid6\t{b}\tcat sofa", f"labelled\tid7\t{b}\t\tanimal"])
    batches = list(make_loader(path, batch_size=3))
    assert [len(x) for x in batches] == [3, 3, 1]
    first = batches[0]
    assert isinstance(first, Batch)
    assert first.line_numbers.dtype == np.int64 and first.line_numbers.tolist() == [1, 2, 3]
    assert first.images.dtype == np.float32 and first.images.shape == (3, 3, SIZE, SIZE)
    assert first.input_ids.dtype == np.int64 and first.input_ids.tolist() == [[13], [13], [13]]
    assert first.image_ids == ["id1", "id2", "id3"]
    expected0 = resize_transform(decode_image(base64.b64decode(img_b64(1))))
    np.testing.assert_array_equal(first.images[0], expected0)
    assert flatten(batches, "tags") == [None] * 5 + ["cat sofa", ""]
    assert flatten(batches, "labels") == [None] * 6 + ["animal"]
    assert flatten(batches, "texts")[-2:] == ["tagged", "labelled"]


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1), (3, 0)])
@pytest.mark.parametrize("num_workers, prefetch", [(1, 0), (2, 1), (2, 4)])
def test_worker_threads_give_the_same_batches_in_order(tmp_path, world_size, rank, num_workers, prefetch):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 24)])
    inline = list(make_loader(path, 4, rank=rank, world_size=world_size))
    threaded = list(make_loader(path, 4, rank=rank, world_size=world_size,
                                num_workers=num_workers, prefetch=prefetch))
    assert_same_batches(inline, threaded)
    assert flatten(inline, "line_numbers") == list(range(rank + 1, 24, world_size))


def test_image_sharding_gives_each_rank_whole_images(tmp_path):
    # 3 captions an image; each rank's batches hold exactly the lines of its images
    lines = [f"caption {n}\tid{k}\t{img_b64(k)}" for k in range(5) for n in range(3)]
    path = write_tsv(tmp_path, lines)
    seen = []
    for rank in range(2):
        batches = list(make_loader(path, 4, rank=rank, world_size=2, shard="image", num_workers=1))
        got = flatten(batches, "line_numbers")
        want = [i + 1 for i in range(15) if image_rank(img_b64(i // 3), 2) == rank]
        assert got == want
        seen += got
    assert sorted(seen) == list(range(1, 16))
    with pytest.raises(ValueError, match="shard"):
        make_loader(path, shard="photo")


# ---------------------------------------------------------------------------------------------
# errors


BAD = {
    "corrupt base64": (CORRUPT_B64, "corrupt base64"),
    "undecodable image": (UNDECODABLE, "undecodable image: cv2.imdecode could not decode"),
    "wrong column count": ("c\tid", "expected 3 to 5 tab-separated columns"),
    "empty text": ("\tid\t" + img_b64(0), "empty text"),
    "invalid UTF-8": (b"\xe4\xb8\timg\t" + img_b64(0).encode(), "invalid UTF-8"),
}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_raises_file_line_after_earlier_batches(tmp_path, kind, num_workers):
    bad, problem = BAD[kind]
    lines = [good_line(i) for i in range(1, 10)]
    lines[4] = bad  # line 5, in the second batch of 3
    path = write_tsv(tmp_path, lines)
    got = []
    with pytest.raises(DataError) as info:
        for batch in make_loader(path, 3, num_workers=num_workers):
            got.append(batch)
    assert str(info.value).startswith(f"{path}:5: ")
    assert problem in str(info.value)
    assert [b.line_numbers.tolist() for b in got] == [[1, 2, 3]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_first_bad_line_wins_whatever_the_kind(tmp_path, num_workers):
    # An image error (found by a worker) before a parse error (found by the reader, ahead).
    lines = [good_line(i) for i in range(1, 10)]
    lines[1], lines[6] = UNDECODABLE, "bad\tcolumns"
    path = write_tsv(tmp_path, lines)
    with pytest.raises(DataError, match=f"^{path}:2: undecodable"):
        list(make_loader(path, 2, num_workers=num_workers, prefetch=4))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_lines_reports_and_keeps_order(tmp_path, num_workers):
    lines = [good_line(i) for i in range(1, 13)]
    lines[1], lines[4], lines[5], lines[9] = CORRUPT_B64, "x\ty", UNDECODABLE, ""
    path = write_tsv(tmp_path, lines)
    loader = make_loader(path, 3, num_workers=num_workers, skip_bad_lines=True)
    batches = list(loader)
    assert flatten(batches, "line_numbers") == [1, 3, 4, 7, 8, 9, 11, 12]
    assert flatten(batches, "image_ids") == ["id1", "id3", "id4", "id7", "id8", "id9", "id11", "id12"]
    report = loader.skip_report
    assert report.count == 4 and report.line_numbers == [2, 5, 6, 10]
    assert "corrupt base64" in report.reasons[2] and "undecodable image" in report.reasons[6]
    assert "lines 2, 5, 6, 10" in report.summary()
    again = list(loader)  # a fresh report for each pass
    assert loader.skip_report.count == 4 and loader.skip_report is not report
    assert_same_batches(batches, again)


def test_batch_whose_lines_are_all_bad_is_not_yielded(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), UNDECODABLE, UNDECODABLE, good_line(4)])
    loader = make_loader(path, 1, num_workers=2, skip_bad_lines=True)
    assert [b.line_numbers.tolist() for b in loader] == [[1], [4]]


@pytest.mark.parametrize("skip_bad_lines", [False, True])
def test_unexpected_worker_exception_propagates_with_file_line(tmp_path, skip_bad_lines):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 8)])
    poison = base64.b64decode(img_b64(6))

    def buggy_decode(data):
        if data == poison:
            raise RuntimeError("boom")
        return decode_image(data)

    loader = make_loader(path, 2, decode_image=buggy_decode, num_workers=2,
                         skip_bad_lines=skip_bad_lines)  # a bug is never skipped
    with pytest.raises(RecordProcessingError) as info:
        list(loader)
    assert str(info.value) == f"{path}:6: RuntimeError in decode_image: boom"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_transform_value_error_is_a_data_error(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), good_line(2)])

    def picky(img):
        raise ValueError("too small")

    loader = BatchLoader(path, 2, picky, length_encoder, decode_image, num_workers=1)
    with pytest.raises(DataError, match=f"^{path}:1: image transform failed: too small"):
        list(loader)


def test_text_encoder_with_wrong_shape_is_rejected(tmp_path):
    path = write_tsv(tmp_path, [good_line(1), good_line(2)])
    loader = BatchLoader(path, 2, resize_transform, lambda t: [len(x) for x in t], decode_image)
    with pytest.raises(ValueError, match=r"text_encoder returned shape \(2,\)"):
        list(loader)


# ---------------------------------------------------------------------------------------------
# resources


def test_read_ahead_is_bounded(tmp_path):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 41)])
    decoded = []

    def counting_decode(data):
        decoded.append(1)
        return decode_image(data)

    prefetch, workers, batch = 1, 2, 2
    it = iter(make_loader(path, batch, decode_image=counting_decode, num_workers=workers,
                          prefetch=prefetch))
    try:
        next(it)
        time.sleep(0.2)  # give the workers every chance to run ahead if they could
        assert len(decoded) <= (prefetch + workers) * batch  # not the whole 40-line file
        next(it)
        time.sleep(0.2)
        assert len(decoded) <= (prefetch + workers + 1) * batch
    finally:
        it.close()


def test_stopping_early_shuts_the_workers_down(tmp_path):
    path = write_tsv(tmp_path, [good_line(i) for i in range(1, 31)])
    before = set(threading.enumerate())
    for batch in make_loader(path, 2, num_workers=2, prefetch=2):
        break  # the iterator is dropped here, which closes it
    started = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("tsv-batch")]
    assert started == []


# ---------------------------------------------------------------------------------------------


def test_golden_set1_through_the_loader():
    path = need_shared("golden", "set1.tsv")
    inline = list(make_loader(path, 5))
    threaded = list(make_loader(path, 5, num_workers=2, prefetch=2))
    assert flatten(inline, "line_numbers") == list(range(1, 24))
    assert_same_batches(inline, threaded)
    assert inline[0].images.shape == (5, 3, SIZE, SIZE)
