"""ernievil2.search: index folders built from a TSV or an image folder, added to, opened and
searched; the model fingerprint, atomic writes, each distinct image embedded once, faiss against
a numpy brute force, bounded queries and thumbnails only from the index.

Most tests use colour towers (an image is its mean colour, a text the colour words it names),
so which image must come first is known; the tests marked slow run the tiny model itself."""
import hashlib
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from ernievil2.embed import Towers
from ernievil2.factory import as_config
from ernievil2.search import (MAX_IMAGE_BYTES, MAX_QUERY_CHARS, IndexFolderError, QueryError,
                              Searcher, SearchError, add_to_index, build_index, read_manifest)
from ernievil2.search import vectors
from ernievil2.search.encoder import Encoder
from ernievil2.data.tsv import DataError
from helpers import make_image, tiny_config, tsv_line

COLOURS = {"红": (220, 30, 30), "绿": (30, 170, 40), "蓝": (30, 40, 220), "黄": (230, 210, 20),
           "紫": (150, 30, 180), "白": (240, 240, 240)}
WORDS = {"红": (1, 0, 0), "绿": (0, 1, 0), "蓝": (0, 0, 1), "黄": (1, 1, 0), "紫": (0.7, 0, 0.8),
         "白": (1, 1, 1)}


def png(rgb, seed=0, size=24):
    """A solid colour with a little noise (seed), as PNG bytes."""
    noise = np.random.default_rng(seed).integers(-8, 9, (size, size, 3))
    img = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ColourEncoder(Encoder):
    """An image is its mean colour, a text the sum of its colour words; image rows counted."""

    def __init__(self, batch_size=4, fail_after=None):
        self.image_rows, self.fail_after = 0, fail_after

        def encode_image(x):
            self.image_rows += len(x)
            if self.fail_after is not None and self.image_rows > self.fail_after:
                raise RuntimeError("the tower failed mid-build")
            return unit(x + 1e-3)

        def encode_text(ids):
            return unit(ids + 1e-3)

        def encode_ids(texts):
            return np.array([np.sum([WORDS[c] for c in t if c in WORDS] or [(0.1, 0.1, 0.1)], 0)
                             for t in texts], np.float32)
        super().__init__(Towers(encode_image, encode_text, 3),
                         lambda rgb: rgb.reshape(-1, 3).mean(0) / 255, encode_ids, batch_size)


def colour_tsv(path, names, captions_per_image=2):
    lines = [tsv_line(f"一个{name}色的方块 {n}", f"id_{name}", png(COLOURS[name]))
             for name in names for n in range(captions_per_image)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def cfg(tmp_path):
    return as_config(tiny_config(tmp_path / "model"))


@pytest.fixture
def index(tmp_path, cfg):
    enc = ColourEncoder()
    build_index(cfg, colour_tsv(tmp_path / "a.tsv", ["红", "绿", "蓝"], 5), tmp_path / "idx",
                encoder=enc)
    return tmp_path / "idx", enc


def open_(path, cfg=None):
    return Searcher.open(path, config=cfg, encoder=ColourEncoder())


# ----------------------------------------------------------------------------- build and search
def test_build_from_a_tsv_embeds_each_distinct_image_once_and_keeps_every_caption(index):
    path, enc = index
    assert enc.image_rows == 3  # 15 lines, 3 photos
    s = open_(path)
    assert len(s) == 3 and s.image_ids == ["id_红", "id_绿", "id_蓝"]
    assert len(s.caption_texts) == 15 and s.caption_rows == [r for r in range(3) for _ in range(5)]
    for word, image_id in (("红", "id_红"), ("绿色", "id_绿"), ("很蓝的东西", "id_蓝")):
        hits = s.text_to_image(word, k=3)
        assert [h.rank for h in hits] == [1, 2, 3] and hits[0].image_id == image_id
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert hits[0].caption == f"一个{image_id[-1]}色的方块 0"
    hit = s.image_to_image(png(COLOURS["蓝"], seed=5), k=1)[0]
    assert hit.image_id == "id_蓝" and hit.thumbnail == "thumbs/000002.jpg"
    caption_hits = s.text_to_text("绿", k=20)
    assert len(caption_hits) == 15 and {h.image_id for h in caption_hits[:5]} == {"id_绿"}
    manifest = read_manifest(path)
    assert (manifest["images"], manifest["captions"], manifest["embed_dim"]) == (3, 15, 3)
    assert isinstance(s.image_embeddings, np.memmap)


def test_thumbnails_are_small_jpegs_of_the_image(tmp_path, cfg):
    big = png(COLOURS["紫"], size=400)
    (tmp_path / "imgs" / "deep").mkdir(parents=True)
    (tmp_path / "imgs" / "deep" / "p.png").write_bytes(big)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    build_index(cfg, tmp_path / "imgs", tmp_path / "idx", encoder=ColourEncoder(), thumbnail_size=64)
    s = open_(tmp_path / "idx")
    assert s.image_ids == ["deep/p.png"] and not s.caption_texts
    thumb = cv2.imread(str(s.thumbnail_file(0)))
    assert thumb.shape[:2] == (64, 64)
    assert np.abs(thumb.reshape(-1, 3).mean(0)[::-1] - COLOURS["紫"]).max() < 10
    with pytest.raises(QueryError, match="no captions"):
        s.text_to_text("紫")
    with pytest.raises(SearchError, match="thumbnail size"):
        build_index(cfg, tmp_path / "imgs", tmp_path / "idx2", encoder=ColourEncoder(),
                    thumbnail_size=100000)


def test_flat_search_is_the_numpy_top_k(tmp_path, cfg):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(40):
        (folder / f"{k:02d}.png").write_bytes(png(rng.integers(0, 256, 3), seed=k))
    build_index(cfg, folder, tmp_path / "idx", encoder=ColourEncoder())
    s = open_(tmp_path / "idx")
    for query in ("红", "绿蓝", "黄紫", "白"):
        hits = s.text_to_image(query, k=7)
        q = s.encode_texts([query])[0]
        scores = np.asarray(s.image_embeddings) @ q
        top = np.argsort(-scores, kind="stable")[:7]
        assert [h.row for h in hits] == top.tolist()
        np.testing.assert_allclose([h.score for h in hits], scores[top], rtol=1e-5)
        assert [h.image_id for h in hits] == [f"{r:02d}.png" for r in top]
    assert len(s.text_to_image("红", k=1000)) == 40


@pytest.mark.parametrize("kind,params", [("ivf", dict(nlist=4, nprobe=2)),
                                         ("hnsw", dict(m=8, ef_search=32))])
def test_approximate_indexes_find_the_exact_top_1(tmp_path, cfg, kind, params):
    # the faiss index on its own, on clustered vectors (what it is for)
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(8, 16)))
    x = unit(centres[rng.integers(8, size=600)] + 0.3 * rng.normal(size=(600, 16)))
    q = unit(x[rng.integers(600, size=50)] + 0.05 * rng.normal(size=(50, 16)))
    settings = vectors.index_settings(kind, **params)
    _, approx = vectors.search(vectors.build(x, settings), q, 1)
    np.testing.assert_array_equal(approx[:, 0], np.argmax(q @ x.T, axis=1))
    # and through an index folder: the settings are stored, top-1 as the flat index
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(60):
        (folder / f"{k:02d}.png").write_bytes(png(rng.integers(0, 256, 3), seed=k))
    build_index(cfg, folder, tmp_path / "flat", encoder=ColourEncoder())
    build_index(cfg, folder, tmp_path / kind, encoder=ColourEncoder(), index_type=kind, **params)
    stored = read_manifest(tmp_path / kind)["vector_index"]
    assert stored["type"] == kind and set(stored.values()) >= {v for v in params.values()}
    flat, approx = open_(tmp_path / "flat"), open_(tmp_path / kind)
    for query in ("红", "绿", "蓝", "黄", "紫", "白", "红蓝"):
        assert approx.text_to_image(query, 1)[0].row == flat.text_to_image(query, 1)[0].row


def test_index_settings_are_checked():
    with pytest.raises(SearchError, match="index type"):
        vectors.index_settings("lsh")
    with pytest.raises(SearchError, match="nlist must be a positive int"):
        vectors.index_settings("ivf", nlist=0)
    with pytest.raises(SearchError, match="efSearch apply to another index type"):
        vectors.index_settings("ivf", ef_search=10)


# ------------------------------------------------------------------------------------- add
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_embeds_only_new_images_and_keeps_the_old_rows(tmp_path, cfg, kind):
    build_index(cfg, colour_tsv(tmp_path / "a.tsv", ["红", "绿"], 2), tmp_path / "idx",
                encoder=ColourEncoder(), index_type=kind)
    before = np.load(tmp_path / "idx" / "image_embeddings.npy")
    thumb0 = (tmp_path / "idx" / "thumbs" / "000000.jpg").read_bytes()
    enc = ColourEncoder()
    manifest = add_to_index(tmp_path / "idx", colour_tsv(tmp_path / "b.tsv", ["绿", "黄", "白"], 3),
                            encoder=enc)
    assert enc.image_rows == 2  # 绿 is in the index already
    assert (manifest["images"], manifest["captions"]) == (4, 2 * 2 + 2 * 3)
    s = open_(tmp_path / "idx")
    assert s.image_ids == ["id_红", "id_绿", "id_黄", "id_白"]
    np.testing.assert_array_equal(np.asarray(s.image_embeddings[:2]), before)
    assert (tmp_path / "idx" / "thumbs" / "000000.jpg").read_bytes() == thumb0
    assert s.text_to_image("黄", 1)[0].image_id == "id_黄"
    assert s.text_to_text("白", 1)[0].caption.startswith("一个白色")
    assert [x["images"] for x in manifest["sources"]] == [2, 2]


# ----------------------------------------------------------------------- fingerprint, atomic
def test_another_model_is_a_one_line_error(tmp_path, index):
    path, _ = index
    other = as_config(tiny_config(tmp_path / "model", seed=1))  # other random weights
    with pytest.raises(IndexFolderError, match="another model.*random_seed"):
        open_(path, other)
    with pytest.raises(IndexFolderError, match="another model"):
        add_to_index(path, tmp_path / "a.tsv", config=other, encoder=ColourEncoder())
    # the vocab the index was built with changed since: its stored config no longer matches
    vocab = tmp_path / "model" / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8") + "新\t99\n", encoding="utf-8")
    with pytest.raises(IndexFolderError, match="vocab_sha256") as e:
        open_(path)
    assert "\n" not in str(e.value)


def test_not_an_index_and_a_future_version_are_one_line_errors(tmp_path, index):
    path, _ = index
    with pytest.raises(FileNotFoundError, match="index folder not found"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(IndexFolderError, match="not a search index"):
        read_manifest(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}), encoding="utf-8")
    with pytest.raises(IndexFolderError, match="version 99"):
        read_manifest(path)


def folder_state(path):
    return {p: hashlib.sha256(open(os.path.join(root, p), "rb").read()).hexdigest()
            for root, _, files in os.walk(path) for p in files}


def test_a_failed_build_or_add_leaves_the_previous_index(tmp_path, cfg, index):
    path, _ = index
    state = folder_state(path)
    big = colour_tsv(tmp_path / "big.tsv", ["黄", "紫", "白", "红", "绿", "蓝"], 1)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_index(cfg, big, path, encoder=ColourEncoder(batch_size=2, fail_after=3))
    with pytest.raises(RuntimeError, match="mid-build"):
        add_to_index(path, big, encoder=ColourEncoder(batch_size=1, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        enc = ColourEncoder()
        enc.texts = lambda texts: (_ for _ in ()).throw(KeyboardInterrupt())  # Ctrl-C at the end
        build_index(cfg, big, path, encoder=enc)
    assert folder_state(path) == state
    assert sorted(os.listdir(tmp_path)) == sorted(["a.tsv", "big.tsv", "idx", "model"])  # no temporaries
    assert open_(path).text_to_image("红", 1)[0].image_id == "id_红"


# -------------------------------------------------------------------------- bounded inputs
def test_thumbnail_file_only_gives_files_of_the_index(tmp_path, index):
    path, _ = index
    s = open_(path)
    assert s.thumbnail_file(2) == (path / "thumbs" / "000002.jpg").resolve()
    for bad in (-1, 3, "../../etc/passwd", "0", 1.0, True, None):
        with pytest.raises(QueryError, match="no image row"):
            s.thumbnail_file(bad)
    outside = tmp_path / "elsewhere"
    shutil.copytree(path / "thumbs", outside)
    shutil.rmtree(path / "thumbs")
    os.symlink(outside, path / "thumbs")
    with pytest.raises(QueryError, match="outside the index folder"):
        s.thumbnail_file(0)


def test_bad_queries_are_query_errors(index):
    s = open_(index[0])
    for bad in ("", "   ", "红" * (MAX_QUERY_CHARS + 1)):
        with pytest.raises(QueryError, match="query text"):
            s.text_to_image(bad)
    with pytest.raises(QueryError, match="more than the limit"):
        s.image_to_image(b"\xff" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(QueryError, match="query image"):
        s.image_to_image(b"GIF89a not really")
    with pytest.raises(QueryError, match="query image: empty"):
        s.image_to_image(b"")
    for k in (0, -3, 1001, 2.5, True):
        with pytest.raises(QueryError, match="k must be"):
            s.text_to_image("红", k=k)


def test_a_decompression_bomb_in_the_source_is_a_bad_line(tmp_path, cfg):
    # a PNG whose header claims 100000 x 100000 pixels: refused from its header, never decoded
    bomb = bytearray(png(COLOURS["红"]))
    bomb[16:24] = (100000).to_bytes(4, "big") * 2
    lines = [tsv_line("红", "ok", png(COLOURS["红"])), tsv_line("炸弹", "bomb", bytes(bomb))]
    (tmp_path / "b.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.tsv:2: undecodable image"):
        build_index(cfg, tmp_path / "b.tsv", tmp_path / "idx", encoder=ColourEncoder())
    assert not (tmp_path / "idx").exists()
    build_index(cfg, tmp_path / "b.tsv", tmp_path / "idx", encoder=ColourEncoder(),
                skip_bad_lines=True)
    assert open_(tmp_path / "idx", as_config(cfg, skip_bad_lines=True)).image_ids == ["ok"]


def test_a_source_with_no_images_is_an_error(tmp_path, cfg):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_index(cfg, tmp_path / "empty", tmp_path / "idx", encoder=ColourEncoder())
    with pytest.raises(FileNotFoundError, match="source not found"):
        build_index(cfg, tmp_path / "missing.tsv", tmp_path / "idx", encoder=ColourEncoder())


def test_faiss_keeps_its_loading_lines_off_the_console():
    import subprocess
    import sys

    from conftest import ROOT
    setup = "import logging; logging.basicConfig(level=logging.INFO); "
    runs = {how: subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "packages")}, timeout=120)
            for how, code in (("plain", "import faiss"),
                              ("ours", "from ernievil2.search.vectors import faiss_module; faiss_module()"))}
    assert "Loading faiss" in runs["plain"].stderr  # what a root logger at INFO shows otherwise
    assert runs["ours"].returncode == 0 and "faiss" not in runs["ours"].stderr.lower()


# --------------------------------------------------------------------- the model and the CLI
def test_the_tiny_model_finds_an_indexed_image_by_its_own_bytes(tmp_path):
    config = tiny_config(tmp_path / "model")
    folder = tmp_path / "imgs"
    folder.mkdir()
    photos = {f"{k}.png": make_image(k) for k in range(6)}
    for name, raw in photos.items():
        (folder / name).write_bytes(raw)
    build_index(config, folder, tmp_path / "idx")
    s = Searcher.open(tmp_path / "idx")
    for name, raw in photos.items():
        hit = s.image_to_image(raw, k=2)[0]
        assert hit.image_id == name and hit.score == pytest.approx(1.0, abs=1e-5)
    emb = s.encode_texts(["红色的圆形", "a red circle"])
    assert emb.shape == (2, len(s.image_embeddings[0]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(s.encode_image_bytes(photos["3.png"]), s.image_embeddings[3:4],
                               atol=1e-5)


def run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_the_commands_build_add_describe_and_search(tmp_path, capsys):
    import yaml
    from ernievil2.search_cli import index_main, search_main
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "model"), allow_unicode=True), encoding="utf-8")
    tsv = str(tmp_path / "model" / "test.tsv")
    idx = str(tmp_path / "idx")
    code, out, _ = run_cli(index_main, ["build", str(config), tsv, idx, "--index-type", "hnsw",
                                        "--hnsw-m", "8", "infer_batch_size=5"], capsys)
    assert code == 0 and "8 images, 8 captions" in out
    code, out, _ = run_cli(index_main, ["info", idx], capsys)
    assert code == 0 and "8 images" in out and "hnsw M=8 efSearch=64" in out
    code, out, _ = run_cli(search_main, [idx, "红色的圆形", "-k", "3"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "image_id", "caption", "thumbnail"]
    assert len(lines) == 2 + 3 and lines[2].split()[0] == "1"
    code, out, _ = run_cli(search_main, [idx, "红色的圆形", "--captions", "-k", "8", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["mode"] == "text_to_text" and len(result["hits"]) == 8
    assert result["hits"][0]["caption"] == "红色的圆形"  # the query is one of the captions
    assert os.path.isfile(result["hits"][0]["thumbnail_path"])
    photo = tmp_path / "q.png"
    photo.write_bytes(make_image(5))  # line 6's image
    code, out, _ = run_cli(search_main, [idx, "--image", str(photo), "-k", "1", "--json"], capsys)
    hit = json.loads(out)["hits"][0]
    assert code == 0 and hit["image_id"] == "img5" and set(hit) == {
        "rank", "score", "row", "image_id", "caption", "thumbnail", "thumbnail_path"}
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "new.png").write_bytes(make_image(99))
    (tmp_path / "more" / "old.png").write_bytes(make_image(2))
    code, out, _ = run_cli(index_main, ["add", idx, str(tmp_path / "more")], capsys)
    assert code == 0 and "9 images" in out

    # user errors: one line each, exit status 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for main, argv, message in (
            (search_main, [str(tmp_path), "x"], "not a search index"),
            (search_main, [idx, "--image", str(tmp_path / "nope.png")], "query image not found"),
            (search_main, [idx, "--image", str(tmp_path / "bad.png")], "query image"),
            (search_main, [idx, "x" * (MAX_QUERY_CHARS + 1)], "query text"),
            (index_main, ["build", str(config), str(tmp_path / "no.tsv"), idx], "source not found"),
            (index_main, ["build", str(config), tsv, idx, "no_such_key=1"], "no_such_key")):
        code, out, err = run_cli(main, argv, capsys)
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert code == 1 and len(errors) == 1 and errors[0].startswith("error: "), (argv, err)
        assert message in errors[0] and "Traceback" not in err, (argv, err)



@pytest.mark.slow
def test_an_index_built_with_the_exported_towers_matches_eager(tmp_path):
    config = tiny_config(tmp_path / "model")
    eager = build_index(config, config["test_file"], tmp_path / "eager")
    fast = build_index(config, config["test_file"], tmp_path / "fast", execution="inference",
                       export_dir=str(tmp_path / "export"))
    assert fast["fingerprint"] == eager["fingerprint"]  # the execution is no part of the model
    np.testing.assert_allclose(np.load(tmp_path / "fast" / "image_embeddings.npy"),
                               np.load(tmp_path / "eager" / "image_embeddings.npy"), atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "fast" / "caption_embeddings.npy"),
                               np.load(tmp_path / "eager" / "caption_embeddings.npy"), atol=1e-4)
    s = Searcher.open(tmp_path / "fast")  # with its stored config: the exported towers again
    assert s.encoder.towers.encode_image.__class__.__name__ == "TowerPredictor"
    a, b = s.text_to_image("红色的圆形", 3), Searcher.open(tmp_path / "eager").text_to_image("红色的圆形", 3)
    assert [h.row for h in a] == [h.row for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-4)


@pytest.mark.slow
def test_two_processes_build_and_add_the_same_index_as_one(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import ROOT
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "model", infer_batch_size=2),
                                     allow_unicode=True), encoding="utf-8")
    tsv = tmp_path / "model" / "test.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    tsv.write_text("\n".join(lines + lines[:3]) + "\n", encoding="utf-8")  # 3 images twice
    more = tmp_path / "more"
    more.mkdir()
    for k in (2, 50, 51, 52):
        (more / f"{k}.png").write_bytes(make_image(k))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "packages")}

    def index_cmd(*argv):
        r = subprocess.run([sys.executable, "-m", "ernievil2.search_cli", *map(str, argv)],
                           capture_output=True, text=True, env=env, timeout=600)
        return r.returncode, r.stdout, r.stderr

    for nproc in (1, 2):
        out = tmp_path / f"idx{nproc}"
        code, stdout, stderr = index_cmd("build", config, tsv, out, "--nproc", nproc)
        assert code == 0 and "8 images, 11 captions" in stdout, stderr[-3000:]
        code, stdout, stderr = index_cmd("add", out, more, "--nproc", nproc)
        assert code == 0 and "11 images, 11 captions" in stdout, stderr[-3000:]
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f".idx{nproc}")]  # no temporaries
    one, two = tmp_path / "idx1", tmp_path / "idx2"
    for name in ("images.json", "captions.json", "manifest.json"):
        a, b = (json.loads((d / name).read_text(encoding="utf-8")) for d in (one, two))
        if name == "manifest.json":
            a.pop("sources"), b.pop("sources")  # where the sources are differs
        assert a == b, name
    np.testing.assert_array_equal(np.load(one / "image_embeddings.npy"), np.load(two / "image_embeddings.npy"))
    assert sorted(os.listdir(two / "thumbs")) == [f"{r:06d}.jpg" for r in range(11)]
    assert all((one / "thumbs" / n).read_bytes() == (two / "thumbs" / n).read_bytes()
               for n in os.listdir(one / "thumbs"))

    # a bad image on the second process's share: one line, the index as it was
    before = folder_state(two)
    (more / "9_bad.png").write_bytes(b"\x89PNG broken")
    (more / "53.png").write_bytes(make_image(53))
    code, stdout, stderr = index_cmd("add", two, more, "--nproc", 2)
    errors = [line for line in (stdout + stderr).splitlines() if "error" in line.lower()]
    assert code == 1 and errors and "9_bad.png: undecodable image" in errors[-1], stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert folder_state(two) == before
