"""The page's server (ernievil2.serve.app) through FastAPI's TestClient, over a stand-in searcher
whose embeddings are computed here by hand (the mean colour of an image, colour words of a text):
every endpoint, the limits and their errors, thumbnails only by row (path traversal), and a raw
socket against a running uvicorn for the paths a client library would normalise."""
import re
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ernievil2.serve.app import (CSP, STATIC, Classifier, Limits, classes_path, create_app, run,
                                 shipped_class_lists)
from ernievil2.search import QueryError
from ernievil2.transforms import decode_image
from ernievil2.zeroshot import load_classes

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (25, 40, 230)}
WORDS = {"red": ("red", "红"), "green": ("green", "绿"), "blue": ("blue", "蓝")}
ROWS = [("red", "一个红色的圆形"), ("green", "a green square"), ("blue", "蓝色的三角形"),
        ("red", "a red square on the left"), ("green", "绿色的圆形")]


class Hit(NamedTuple):
    rank: int
    score: float
    row: int
    image_id: str
    caption: str
    thumbnail: str


def png(rgb, size=(24, 24)):
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = rgb
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeSearcher:
    """The Searcher interface over hand-made embeddings: an image is its mean colour, a text the
    count of its colour words (plus a little of everything, so no text is all zeros)."""

    def __init__(self, index_dir: Path):
        self.index_dir = index_dir
        (index_dir / "thumbs").mkdir(parents=True)
        for row, (colour, _) in enumerate(ROWS):
            (index_dir / "thumbs" / f"{row}.png").write_bytes(png(COLOURS[colour]))
        self.images = unit([COLOURS[c] for c, _ in ROWS])
        self.captions = self.encode_texts([c for _, c in ROWS])
        self.calls = []

    def __len__(self):
        return len(ROWS)

    def encode_texts(self, texts):
        return unit([[sum(t.count(w) for w in WORDS[c]) + 0.01 for c in COLOURS] for t in texts])

    def encode_image_bytes(self, data):
        try:
            pixels = decode_image(data)
        except ValueError as e:  # as the real one
            raise QueryError(f"query image: {e}") from None
        return unit(pixels.reshape(-1, 3).mean(axis=0)[None])

    def _hits(self, table, query, k):
        s = table @ query[0]
        order = np.argsort(-s, kind="stable")[:k]
        return [Hit(r + 1, float(s[i]), int(i), f"img{i}", ROWS[i][1], f"thumbs/{i}.png")
                for r, i in enumerate(order)]

    def text_to_image(self, query, k=10):
        self.calls.append(("text_to_image", query, k))
        return self._hits(self.images, self.encode_texts([query]), k)

    def image_to_image(self, data, k=10):
        return self._hits(self.images, self.encode_image_bytes(data), k)

    def text_to_text(self, query, k=10):
        return self._hits(self.captions, self.encode_texts([query]), k)

    def thumbnail_file(self, row):
        return self.index_dir / "thumbs" / f"{row}.png"


@pytest.fixture
def searcher(tmp_path):
    return FakeSearcher(tmp_path / "index")


def client_for(searcher, classes=("red", "green", "blue"), **limits):
    classifier = Classifier.build(searcher.encode_texts, list(classes), ["a {} thing", "{}"]) if classes else None
    return TestClient(create_app(searcher, classifier, Limits(**limits), lang="en"))


@pytest.fixture
def client(searcher):
    return client_for(searcher)


def one_line_error(response, status):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------- the page
def test_the_page_and_its_files_are_local_utf8_and_bilingual(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta charset="utf-8">' in page.text
    assert page.headers["content-security-policy"] == CSP and "'self'" in CSP
    for name in ("app.js", "style.css", "favicon.svg"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text(encoding="utf-8")
    for path in STATIC.iterdir():  # nothing fetched from another origin
        text = path.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    assert "以图搜图" in js and "Search by image" in js and "零样本分类" in js
    # no Swagger UI (it loads its code from a CDN); the schema itself is served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/captions", "/api/classify", "/api/info",
            "/thumbs/{row}"} <= set(paths)


def test_info(client):
    info = client.get("/api/info").json()
    assert info["images"] == len(ROWS) and info["index"] == "index" and info["lang"] == "en"
    assert info["classes"] == ["red", "green", "blue"] and info["templates"] == ["a {} thing", "{}"]
    assert info["limits"]["max_k"] == 100 and info["limits"]["max_query_chars"] == 256


# ------------------------------------------------------------------------------------ search
def test_text_search_ranks_by_the_searchers_scores_and_links_thumbnails(client, searcher):
    r = client.get("/api/search", params={"q": "  红色  的东西 ", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "红色 的东西" and body["k"] == 3  # whitespace collapsed
    assert searcher.calls == [("text_to_image", "红色 的东西", 3)]
    hits = body["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert {hits[0]["row"], hits[1]["row"]} == {0, 3}  # the two red images
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    expected = unit(COLOURS["red"]) @ searcher.encode_texts(["红色 的东西"])[0]
    assert hits[0]["score"] == pytest.approx(float(expected), abs=1e-5)
    for h in hits:
        assert h["thumbnail"] == f"/thumbs/{h['row']}" and h["caption"] == ROWS[h["row"]][1]
        thumb = client.get(h["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert thumb.content == searcher.thumbnail_file(h["row"]).read_bytes()


def test_image_search_and_caption_search(client):
    r = client.post("/api/search/image", params={"k": 2},
                    files={"image": ("b.png", png(COLOURS["blue"]), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["row"] == 2 and len(r.json()["hits"]) == 2
    r = client.get("/api/captions", params={"q": "green"})
    assert r.status_code == 200
    assert [h["row"] for h in r.json()["hits"][:2]] in ([1, 4], [4, 1])
    assert len(r.json()["hits"]) == len(ROWS)  # k=10 over 5 rows: all of them


def test_zero_shot_classification_uses_the_class_embeddings(client, searcher):
    r = client.post("/api/classify", files={"image": ("g.png", png((40, 190, 60)), "image/png")})
    assert r.status_code == 200, r.text
    classes = r.json()["classes"]
    assert [c["name"] for c in classes][0] == "green" and len(classes) == 3
    # by hand: each class is the mean of its two normalised prompts, renormalised
    image = searcher.encode_image_bytes(png((40, 190, 60)))[0]
    for c in classes:
        prompts = searcher.encode_texts([f"a {c['name']} thing", c["name"]])
        mean = unit(prompts.mean(axis=0))
        assert c["score"] == pytest.approx(float(image @ mean), abs=1e-5)
    r = client.post("/api/classify", params={"k": 1}, files={"image": ("g.png", png((40, 190, 60)))})
    assert [c["name"] for c in r.json()["classes"]] == ["green"]


def test_classify_without_classes_is_a_clear_404(searcher):
    r = client_for(searcher, classes=None).post("/api/classify", files={"image": ("a.png", png((1, 2, 3)))})
    assert "--classes" in one_line_error(r, 404)


# ---------------------------------------------------------------------------- limits, errors
@pytest.mark.parametrize("params, words", [
    ({"q": ""}, "empty query"), ({"q": "   "}, "empty query"), ({"q": "红" * 257}, "257 characters"),
    ({"q": "red", "k": 0}, "out of range 1..100"), ({"q": "red", "k": 101}, "out of range"),
    ({"q": "red", "k": "ten"}, "k: "), ({}, "q: "),
])
def test_bad_queries_are_422_with_one_line(client, params, words):
    for endpoint in ("/api/search", "/api/captions"):
        assert words in one_line_error(client.get(endpoint, params=params), 422)


def test_a_query_at_the_limit_is_accepted(client):
    assert client.get("/api/search", params={"q": "红" * 256}).status_code == 200


def test_upload_limits_bytes_pixels_and_undecodable(searcher):
    client = client_for(searcher, max_upload_bytes=2000, max_image_pixels=100 * 100)
    small = png(COLOURS["red"], (20, 20))
    assert client.post("/api/search/image", files={"image": ("s.png", small)}).status_code == 200
    noise = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))[1].tobytes()
    assert 2000 < len(noise) < 2000 + 64 * 1024
    # over the byte limit: refused from the declared length, before the body is parsed
    big = b"\x89PNG" + bytes(100_000)
    for endpoint in ("/api/search/image", "/api/classify"):
        assert "over the limit of 2,000 bytes" in one_line_error(
            client.post(endpoint, files={"image": ("big.png", big)}), 413)
    # over the byte limit, but under the request limit (the multipart allowance): read and refused
    assert "over the limit of 2,000 bytes" in one_line_error(
        client.post("/api/search/image", files={"image": ("n.png", noise)}), 413)
    # a small file whose header says too many pixels
    wide = png(COLOURS["red"], (101, 100))
    assert len(wide) < 2000
    assert "101x100 = 10,100 pixels" in one_line_error(
        client.post("/api/classify", files={"image": ("wide.png", wide)}), 413)
    for data, words in ((b"not an image at all", "not a decodable image"), (b"", "empty upload")):
        assert words in one_line_error(client.post("/api/search/image", files={"image": ("x.png", data)}), 400)
    assert "image: " in one_line_error(client.post("/api/search/image", data={"k": "1"}), 422)


def test_a_body_without_length_is_refused(client):
    def chunks():
        yield b"--x\r\n"
    r = client.post("/api/search/image", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert "Content-Length" in one_line_error(r, 411)


# ---------------------------------------------------------------------------- thumbnails only
@pytest.mark.parametrize("path", [
    "/thumbs/5", "/thumbs/-1", "/thumbs/99999999999999999999", "/thumbs/1.0", "/thumbs/0x1",
    "/thumbs/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/thumbs/..%2F..%2Fetc%2Fpasswd",
    "/thumbs/%252e%252e%252fetc%252fpasswd", "/thumbs/thumbs%2F0.png", "/thumbs/0/../../etc/passwd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e/app.py",
])
def test_thumbnails_only_by_row_number(client, path):
    r = client.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert b"root:" not in r.content and b"import" not in r.content


def test_a_thumbnail_outside_the_index_is_not_served(tmp_path, searcher):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png((1, 2, 3)))
    (searcher.index_dir / "thumbs" / "1.png").unlink()
    (searcher.index_dir / "thumbs" / "1.png").symlink_to(outside)
    client = client_for(searcher)
    assert client.get("/thumbs/0").status_code == 200
    assert "row 1 has no thumbnail" in one_line_error(client.get("/thumbs/1"), 404)


def raw_get(port, target):
    """One HTTP request with the target sent exactly as written (no client-side normalising)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_traversal_over_a_real_socket(searcher, tmp_path):
    import uvicorn
    (tmp_path / "secret.txt").write_text("root:x:0:0", encoding="utf-8")
    app = create_app(searcher, None, Limits())
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = sock.getsockname()[1]
        assert raw_get(port, "/thumbs/0")[0] == 200
        for target in ("/thumbs/../../etc/passwd", "/thumbs/../secret.txt", "/thumbs/..%2f..%2fsecret.txt",
                       "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/app.py",
                       "/thumbs/%2e%2e/%2e%2e/secret.txt", "/../../../etc/passwd"):
            status, data = raw_get(port, target)
            assert status in (400, 404, 422), (target, status)
            assert b"root:" not in data and b"import " not in data, target
    finally:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------------------------------------------- the command
def test_class_lists_by_name_or_path(tmp_path):
    assert {"everyday", "demo_shapes"} <= set(shipped_class_lists())
    assert load_classes(classes_path("demo_shapes"), "zh")[0] == "红色的圆形"
    assert load_classes(classes_path("demo_shapes.tsv"), "en")[0] == "red circle"
    assert len(load_classes(classes_path("everyday"), "en")) == len(load_classes(classes_path("everyday"), "zh"))
    mine = tmp_path / "mine.txt"
    mine.write_text("cat\n", encoding="utf-8")
    assert classes_path(str(mine)) == str(mine)


def test_command_errors_are_one_line(tmp_path, capsys):
    from ernievil2.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(run, [str(tmp_path), "--classes", "no_such_list"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --classes not found: no_such_list (shipped lists:") and "\n" not in err
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        assert run([str(tmp_path), "--port", str(port), "--classes", "demo_shapes"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "\n" not in err
    finally:
        busy.close()
    with pytest.raises(SystemExit):
        run([str(tmp_path), "--port", "70000"])
    assert "out of range" in capsys.readouterr().err


# ------------------------------------------------------------------ over a real index folder
def test_the_app_over_a_real_index(tmp_path):
    """ernievil2.search's Searcher on an index built with a tiny random model: the page's calls
    reach it, thumbnails come from the index's files, its refusals are one-line errors."""
    from ernievil2.search import Searcher, build_index
    from helpers import make_image, tiny_config
    cfg = tiny_config(tmp_path / "model")
    build_index(cfg, cfg["test_file"], tmp_path / "index")
    searcher = Searcher.open(tmp_path / "index")
    client = client_for(searcher, classes=("红色的圆形", "蓝色方块"))
    info = client.get("/api/info").json()
    assert info["images"] == len(searcher) == 8
    hits = client.get("/api/search", params={"q": "红色的圆形", "k": 3}).json()["hits"]
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    for h in hits:
        thumb = client.get(h["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content == searcher.thumbnail_file(h["row"]).read_bytes()
    # an indexed image's own bytes find it first, whatever the (random) model
    r = client.post("/api/search/image", files={"image": ("q.png", make_image(3))})
    first = r.json()["hits"][0]
    assert first["image_id"] == "img3" and first["score"] == pytest.approx(1.0, abs=1e-4)
    captions = client.get("/api/captions", params={"q": "蓝色方块", "k": 8}).json()["hits"]
    assert "蓝色方块" in [h["caption"] for h in captions]
    classes = client.post("/api/classify", files={"image": ("q.png", make_image(3))}).json()["classes"]
    assert sorted(c["name"] for c in classes) == ["红色的圆形", "蓝色方块"]
    assert "not a decodable image" in one_line_error(
        client.post("/api/classify", files={"image": ("x.png", b"no image here")}), 400)
    assert client.get(f"/thumbs/{len(searcher)}").status_code == 404


def test_the_command_names_a_missing_index_in_one_line(tmp_path, capsys):
    from ernievil2.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(run, [str(tmp_path / "nowhere"), "--port", "0", "--classes", "demo_shapes"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err
