"""`ernievil2-download` against a server on 127.0.0.1 (nothing leaves the machine): resume after an
interrupted transfer, md5 and structural rejection, the offline message, the conversions
(PaddleNLP -> official layout, timm Lite0 -> image tower) and the downloaded vocab's token ids."""
import dataclasses
import hashlib
import http.server
import json
import os
import socket
import threading

import numpy as np
import paddle
import pytest
from conftest import need_shared

from ernievil2 import pretrained
from ernievil2.checkpoint import load_checkpoint, official_to_paddlenlp
from ernievil2.download import DownloadError, Interrupted, download, main
from ernievil2.factory import build_dual_encoder, resolve_image_spec
from ernievil2.models.efficientnet import build_efficientnet
from ernievil2.models.lite0_timm import HEAD_PREFIX, classifier_from_checkpoint, timm_names
from ernievil2.tokenizer import ErnieTokenizer, load_vocab

TINY_VIT = {"type": "vit", "image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2}
TINY_ERNIE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
              "max_position_embeddings": 16}


class Server:
    """Serves `files` ({url path: bytes}) with HTTP Range; `drop_after` ({path: n}) makes the
    first request for a path send its full length but close after n bytes."""

    def __init__(self):
        self.files, self.drop_after, self.requests, self.honour_range = {}, {}, [], True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and server.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = server.drop_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve(self, entry, data):
        self.files[f"/{entry.name}/{os.path.basename(entry.url)}"] = data


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = Server()
    srv.thread.start()
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(pretrained.BASE_ENV, srv.base)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def md5(data):
    return hashlib.md5(data).hexdigest()


def vocab_entry(data, **changes):
    """The registry's vocab entry, with the md5 of what the test serves."""
    return dataclasses.replace(pretrained.REGISTRY["ernie-3.0-base-zh-vocab"], md5=md5(data), **changes)


SMALL_VOCAB = "".join(f"{t}\n" for t in ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"] +
                      [chr(0x4e00 + i) for i in range(3000)]).encode()


def leftovers(home):
    """Files left in the cache besides the checked ones (parts, raw downloads, temporaries)."""
    return sorted(os.path.relpath(os.path.join(d, f), home) for d, _, fs in os.walk(home)
                  for f in fs if os.path.basename(d) != "pretrained" or f.startswith("."))


# --------------------------------------------------------------------------- HTTP behaviour
def test_interrupted_download_resumes_with_range(server):
    entry = vocab_entry(SMALL_VOCAB)
    server.serve(entry, SMALL_VOCAB)
    path = f"/{entry.name}/vocab.txt"
    server.drop_after[path] = 5000
    reg = {entry.name: entry}
    with pytest.raises(Interrupted, match="run the command again to resume"):
        download(entry.name, registry=reg, retries=0, progress=False)
    part = pretrained.raw_path(entry) + ".part"
    assert os.path.getsize(part) == 5000
    out = download(entry.name, registry=reg, retries=0, progress=False)
    assert server.requests == [(path, None), (path, "bytes=5000-")]
    with open(out, "rb") as f:
        assert f.read() == SMALL_VOCAB
    assert leftovers(pretrained.home()) == []
    # Present: resolved from the cache without asking the server again.
    assert download(entry.name, registry=reg, progress=False) == out
    assert pretrained.resolve(entry.name, pretrained.VOCAB, registry=reg) == out
    assert len(server.requests) == 2


def test_retries_resume_within_one_run(server):
    entry = vocab_entry(SMALL_VOCAB)
    server.serve(entry, SMALL_VOCAB)
    server.drop_after[f"/{entry.name}/vocab.txt"] = 777
    out = download(entry.name, registry={entry.name: entry}, retries=1, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=777-"]
    with open(out, "rb") as f:
        assert md5(f.read()) == entry.md5


def test_a_server_ignoring_range_restarts_the_file(server):
    entry = vocab_entry(SMALL_VOCAB)
    server.serve(entry, SMALL_VOCAB)
    server.honour_range = False
    os.makedirs(os.path.dirname(pretrained.raw_path(entry)))
    with open(pretrained.raw_path(entry) + ".part", "wb") as f:
        f.write(b"garbage that must not stay in front")
    out = download(entry.name, registry={entry.name: entry}, progress=False)
    with open(out, "rb") as f:
        assert f.read() == SMALL_VOCAB


def test_a_complete_part_file_is_finished_without_a_body(server):
    entry = vocab_entry(SMALL_VOCAB)
    server.serve(entry, SMALL_VOCAB)
    os.makedirs(os.path.dirname(pretrained.raw_path(entry)))
    with open(pretrained.raw_path(entry) + ".part", "wb") as f:
        f.write(SMALL_VOCAB)
    out = download(entry.name, registry={entry.name: entry}, progress=False)
    assert [r for _, r in server.requests] == [f"bytes={len(SMALL_VOCAB)}-"]  # answered 416
    with open(out, "rb") as f:
        assert f.read() == SMALL_VOCAB


def test_md5_mismatch_is_rejected_and_deleted(server):
    entry = vocab_entry(SMALL_VOCAB)
    corrupt = bytearray(SMALL_VOCAB)
    corrupt[100] ^= 1
    server.serve(entry, bytes(corrupt))
    with pytest.raises(DownloadError) as err:
        download(entry.name, registry={entry.name: entry}, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"md5 {md5(bytes(corrupt))}" in msg and entry.md5 in msg
    assert "rejected and deleted" in msg
    assert not os.path.exists(pretrained.cache_path(entry))
    assert leftovers(pretrained.home()) == []


def test_offline_names_the_url_and_where_to_copy_the_file(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(pretrained.BASE_ENV, f"http://127.0.0.1:{port}")
    entry = pretrained.REGISTRY["ernie_vil-2.0-base-zh"]
    with pytest.raises(DownloadError) as err:
        download(entry.name, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"cannot reach http://127.0.0.1:{port}/ernie_vil-2.0-base-zh/model_state.pdparams" in msg
    assert f"Copy that file by hand to {pretrained.raw_path(entry)}" in msg


def test_a_file_copied_by_hand_is_checked_and_placed_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(pretrained.BASE_ENV, "http://127.0.0.1:1")  # would fail if asked
    entry = vocab_entry(SMALL_VOCAB)
    os.makedirs(os.path.dirname(pretrained.raw_path(entry)))
    with open(pretrained.raw_path(entry), "wb") as f:
        f.write(SMALL_VOCAB)
    out = download(entry.name, registry={entry.name: entry}, progress=False)
    assert load_vocab(out)["[UNK]"] == 4


def test_a_vocab_with_wrong_special_ids_is_rejected(server):
    data = SMALL_VOCAB.replace(b"[CLS]\n[SEP]", b"[SEP]\n[CLS]")
    entry = vocab_entry(data)
    server.serve(entry, data)
    with pytest.raises(DownloadError, match=r"\[CLS\] at 2 \(not 1\); \[SEP\] at 1 \(not 2\)"):
        download(entry.name, registry={entry.name: entry}, progress=False)


def test_cli_lists_fetches_and_reports_errors(server, capsys):
    entry = pretrained.REGISTRY["ernie-3.0-base-zh-vocab"]
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in pretrained.REGISTRY) and "not downloaded" in listing
    assert main(["no-such-name"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown name 'no-such-name'") and err.count("\n") == 1
    server.serve(entry, SMALL_VOCAB)  # not the published file: the md5 rejects it
    assert main([entry.name]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "1c1c1f4fd93c5bed3b4eebec4de976a8" in err


# ---------------------------------------------------------------------- ERNIE-ViL weights
def tiny_entry(tmp_path, fmt_name, state):
    text_config = tmp_path / "tiny_ernie.json"
    text_config.write_text(json.dumps(TINY_ERNIE), encoding="utf-8")
    return dataclasses.replace(
        pretrained.REGISTRY[fmt_name], model={"image_model": TINY_VIT, "text_model_config": str(text_config)},
        md5=None, tensors=len(state), parameters=sum(int(v.size) for v in state.values()))


def serialized(state, tmp_path):
    path = tmp_path / "served.pdparams"
    paddle.save(state, str(path))
    return path.read_bytes()


@pytest.fixture
def tiny_model(tmp_path):
    paddle.seed(3)
    text_config = tmp_path / "tiny_ernie.json"
    text_config.write_text(json.dumps(TINY_ERNIE), encoding="utf-8")
    model = build_dual_encoder(TINY_VIT, str(text_config))
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["paddlenlp", "official"])
def test_weights_are_converted_to_the_official_layout_and_checked(server, tmp_path, tiny_model, layout):
    model, state = tiny_model
    if layout == "paddlenlp":
        served = official_to_paddlenlp(state)
        entry = tiny_entry(tmp_path, "ernie_vil-2.0-base-zh", state)
    else:  # the official file carries an unused ImageNet head
        served = {**state, "visual.classfy.weight": np.ones((32, 10), np.float32)}
        entry = tiny_entry(tmp_path, "ernie-vil2-base-vit", state)
    data = serialized(served, tmp_path)
    if layout == "paddlenlp":
        entry = dataclasses.replace(entry, md5=md5(data))
    server.serve(entry, data)
    out = download(entry.name, registry={entry.name: entry}, progress=False)
    saved = paddle.load(out, return_numpy=True)
    assert sorted(saved) == sorted(state)  # official names, the head dropped
    for p in model.parameters():
        p.set_value(paddle.zeros_like(p))
    info = load_checkpoint(model, out)
    assert info["layout"] == "official" and info["loaded"] == len(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k])


def test_weights_of_another_model_are_rejected(server, tmp_path, tiny_model):
    _, state = tiny_model
    entry = tiny_entry(tmp_path, "ernie-vil2-base-vit", state)
    served = dict(state)
    del served["text_model.pooler.weight"]
    served["text_model.word_emb.weight"] = np.zeros((65, 32), np.float32)
    server.serve(entry, serialized(served, tmp_path))
    with pytest.raises(DownloadError) as err:
        download(entry.name, registry={entry.name: entry}, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "missing (1): text_model.pooler.weight" in msg
    assert "text_model.word_emb.weight [65, 32] vs [64, 32]" in msg
    assert f"{len(state) - 1} tensors, expected {len(state)}" in msg
    assert not os.path.exists(pretrained.cache_path(entry))
    assert leftovers(pretrained.home()) == []


def test_a_file_that_is_not_a_checkpoint_is_rejected(server, tmp_path, tiny_model):
    entry = tiny_entry(tmp_path, "ernie-vil2-base-vit", tiny_model[1])
    server.serve(entry, b"<html>503 Service Unavailable</html>")
    with pytest.raises(DownloadError, match="not a readable Paddle checkpoint.*rejected and deleted"):
        download(entry.name, registry={entry.name: entry}, progress=False)


# ---------------------------------------------------------------------- timm Lite0
def timm_safetensors(model, path, drop=(), extra=None):
    """Write `model`'s weights as timm names them (torch Linear layout, BN counters included)."""
    from safetensors.numpy import save_file

    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {}
    for theirs, ours in timm_names(model).items():
        arr = state[ours].T if ours == "classifier.weight" else state[ours]
        tensors[theirs] = np.ascontiguousarray(arr)
        if theirs.endswith(".running_var"):
            tensors[theirs.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    for k in drop:
        del tensors[k]
    for k, shape in (extra or {}).items():
        tensors[k] = np.zeros(shape, np.float32)
    save_file(tensors, str(path))
    return path.read_bytes()


def lite0_entry():
    return pretrained.REGISTRY["efficientnet-lite0-imagenet"]


def test_timm_lite0_becomes_an_image_tower_checkpoint(server, tmp_path):
    paddle.seed(5)
    model = build_efficientnet("lite0", with_classifier=True)
    entry = lite0_entry()
    server.serve(entry, timm_safetensors(model, tmp_path / "model.safetensors"))
    out = download(entry.name, progress=False)
    saved = paddle.load(out, return_numpy=True)
    assert sum(k.startswith("visual.") and not k.startswith(HEAD_PREFIX) for k in saved) == 245
    np.testing.assert_array_equal(saved[HEAD_PREFIX + "weight"], model.classifier.weight.numpy())
    restored = classifier_from_checkpoint(out)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[k].numpy(), v.numpy())
    # init_image_tower: the dual encoder's tower loads it strictly; the head is dropped.
    text_config = tmp_path / "tiny_ernie.json"
    text_config.write_text(json.dumps(TINY_ERNIE), encoding="utf-8")
    dual = build_dual_encoder("efficientnet_lite0", str(text_config))
    info = load_checkpoint(dual, out, prefix_filter="visual.")
    assert info["loaded"] == 245 and sorted(info["dropped"]) == [HEAD_PREFIX + "bias", HEAD_PREFIX + "weight"]
    np.testing.assert_array_equal(dual.visual.conv_head.weight.numpy(), model.conv_head.weight.numpy())
    assert resolve_image_spec("efficientnet_lite0")["name"] == "lite0"


def test_timm_file_of_another_network_is_rejected(server, tmp_path):
    model = build_efficientnet("lite0", with_classifier=True)
    entry = lite0_entry()
    server.serve(entry, timm_safetensors(model, tmp_path / "model.safetensors",
                                         drop=["blocks.3.2.bn2.running_mean"],
                                         extra={"blocks.1.0.se.conv_reduce.weight": (4, 96, 1, 1)}))
    with pytest.raises(DownloadError) as err:
        download(entry.name, progress=False)
    msg = str(err.value)
    assert "missing (1): blocks.7.bn_depthwise._mean" in msg  # timm's stage 3, block 2
    assert "unexpected (1): blocks.1.0.se.conv_reduce.weight" in msg and "rejected" in msg
    assert leftovers(pretrained.home()) == []


@pytest.mark.shared
def test_timm_lite0_from_the_reference_weights_classifies_imagenet50(server, tmp_path):
    """The reference Lite0 (../shared's npz, served in timm's layout) downloaded and converted
    predicts the 50 photos as the reference network does (as the npz port: >= 48/50)."""
    from test_efficientnet import LITE0, NPZ, read_imagenet50_labels, reference_preprocess

    from ernievil2.models.lite0_port import load_lite0_npz

    port = build_efficientnet("lite0", with_classifier=True)
    load_lite0_npz(port, need_shared(*NPZ))
    entry = lite0_entry()
    server.serve(entry, timm_safetensors(port, tmp_path / "model.safetensors"))
    model = classifier_from_checkpoint(download(entry.name, progress=False))
    for k, v in port.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k].numpy(), v.numpy())
    folder = need_shared(*LITE0, "imagenet50")
    rows = read_imagenet50_labels(folder / "labels.tsv")
    pixels = np.stack([reference_preprocess(folder / f) for f, _, _ in rows])
    with paddle.no_grad():
        pred = np.concatenate([model(paddle.to_tensor(pixels[i:i + 10])).numpy().argmax(1)
                               for i in range(0, len(pixels), 10)])
    agree = sum(int(p == top5[0]) for p, (_, _, top5) in zip(pred, rows))
    assert agree >= 48, f"top-1 agrees with the reference on {agree}/50"


# ---------------------------------------------------------------------- vocab
@pytest.mark.shared
def test_downloaded_vocab_gives_the_official_token_ids(server):
    """PaddleNLP's vocab is one token a line; served as such (from ../shared's official
    `token<TAB>id` file), downloaded, it must tokenize as the official reader did."""
    official = need_shared("data", "vocab", "ernie-3.0-base-zh", "vocab.txt")
    by_id = {}
    for line in official.read_text(encoding="utf-8").splitlines():
        token, idx = line.split("\t")
        by_id[int(idx)] = token
    assert sorted(by_id) == list(range(len(by_id)))  # no holes: line index = id
    data = "".join(f"{by_id[i]}\n" for i in range(len(by_id))).encode("utf-8")
    entry = vocab_entry(data)
    server.serve(entry, data)
    out = download(entry.name, registry={entry.name: entry}, progress=False)
    rows = [json.loads(line) for line in need_shared("golden", "official_tokens_set1.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    got = ErnieTokenizer.from_file(out).batch_encode([r["text"] for r in rows])
    assert got.tolist() == [r["input_ids"] for r in rows]
    assert os.path.getsize(out) == len(data)
