"""The search page in a real browser: Debian's Chromium driven by Selenium against
`ernievil2-serve` on a free loopback port, over an index of drawn shapes built with a demo-size
model trained here for a minute. It types a query, waits for the grid and checks the drawn image
of that description comes first, classifies an uploaded image, saves a screenshot (in the test's
tmp folder, and at $ERNIEVIL2_SCREENSHOT when set: the README's), searches by the uploaded image,
shows an upload error and switches the language.

Without Chromium / chromedriver the test skips with the reason (`make browser-deps` installs
them); with CI=true it fails instead."""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from make_demo_data import COLOURS, SHAPES, draw  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CLASSES = [(c, s) for c in list(COLOURS)[:3] for s in SHAPES]  # red/green/blue x circle/square/triangle
QUERY, EXPECTED = "红色的三角形", "shape2"  # the index's red triangle


def name(colour, shape):
    return f"{colour[0]}的{shape[0]}"


def need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    reason = f"browser test: {' and '.join(missing)} not found (make browser-deps installs Debian's " \
             "chromium, chromium-driver and fonts-wqy-microhei)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def png_bytes(img):
    return cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()


def trained_model(folder):
    """A demo-size model trained 300 steps on 300 drawn shapes (9 classes): it ranks a drawn
    shape's description first among one drawing of each class."""
    from ernievil2.cli import load_train_config
    from ernievil2.tokenizer import build_vocab, write_vocab
    from ernievil2.train.loop import train
    rng = np.random.default_rng(0)
    lines = []
    for k in range(300):
        colour, shape = CLASSES[rng.integers(len(CLASSES))]
        img = draw(rng, COLOURS[colour], shape[1], ("left", "right", "top", "bottom")[k % 4], 1, 64)
        lines.append("\t".join([name(colour, shape), f"t{k}", base64.b64encode(png_bytes(img)).decode(),
                                "", name(colour, shape)]))
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_vocab(build_vocab([name(c, s) for c, s in CLASSES] + ["一个"]), str(folder / "vocab.txt"))
    demo = yaml.safe_load((ROOT / "packages" / "configs" / "demo_tiny.yaml").read_text(encoding="utf-8"))
    cfg = {"device": "cpu", "max_text_seqlen": 16, "vocab_file": str(folder / "vocab.txt"),
           "text_model_config": demo["text_model_config"], "image_model": demo["image_model"],
           "embed_dim": demo["embed_dim"], "train_file": str(folder / "train.tsv"),
           "output_dir": str(folder / "run"), "log_dir": str(folder / "run"), "batch_size": 32,
           "max_steps": 300, "lr": 1e-3, "warmup_steps": 15, "augment": False, "save_every": 1000,
           "log_every": 100, "val_every": 1000, "num_workers": 0, "views": [["image", "text", 1.0]],
           "targets": "unicl", "unicl_key": "label"}  # rows of one class are positives of each other
    (folder / "train.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    train(load_train_config(str(folder / "train.yaml")))
    return folder / "run" / "final" / "infer.yaml"


def drawn_index(folder, infer_yaml):
    """An index of one new drawing per class (ids shape0..shape8, captions = class names)."""
    from ernievil2.search import build_index
    rng = np.random.default_rng(7)
    lines, files = [], {}
    for k, (colour, shape) in enumerate(CLASSES):
        data = png_bytes(draw(rng, COLOURS[colour], shape[1], "left", 1, 96))
        files[f"shape{k}"] = folder / f"shape{k}.png"
        files[f"shape{k}"].write_bytes(data)
        lines.append("\t".join([name(colour, shape), f"shape{k}", base64.b64encode(data).decode()]))
    (folder / "index.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_index(str(infer_yaml), str(folder / "index.tsv"), str(folder / "index"))
    return folder / "index", files


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(address, image files) of ernievil2-serve on a free loopback port over the drawn index."""
    need_browser()
    folder = tmp_path_factory.mktemp("browser")
    index, files = drawn_index(folder, trained_model(folder))
    (folder / "classes.txt").write_text("\n".join(name(c, s) for c, s in CLASSES) + "\n", encoding="utf-8")
    (folder / "templates.txt").write_text("{}\n一个{}\n", encoding="utf-8")
    log = open(folder / "serve.log", "w+", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "packages"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "ernievil2.serve.app", str(index), "--port", "0",
                             "--classes", str(folder / "classes.txt"), "--templates",
                             str(folder / "templates.txt")], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=folder)
    try:
        address, deadline = None, time.monotonic() + 300
        while address is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            log.seek(0)
            found = re.search(r"ernievil2-serve: (http://127\.0\.0\.1:\d+/) ", log.read())
            address = found and found[1]
        log.seek(0)
        assert address, f"the server did not start:\n{log.read()[-3000:]}"
        yield address, files, log
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def browser(served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,960",
                "--lang=zh-CN"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def api(address, path, **params):
    with urllib.request.urlopen(f"{address.rstrip('/')}{path}?{urllib.parse.urlencode(params)}", timeout=60) as r:
        return json.loads(r.read().decode("utf-8"))


def test_the_page_in_chromium(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    address, files, log = served
    wait = WebDriverWait(browser, 60)

    def cards():
        return [(e.get_attribute("data-image-id"), e.find_element(By.CLASS_NAME, "score").text)
                for e in browser.find_elements(By.CSS_SELECTOR, "#grid .hit")]

    browser.get(address)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert browser.title == "ERNIE-ViL 2.0 图文搜索"
    assert browser.find_element(By.ID, "info").text == f"索引：{len(CLASSES)} 张图片 · {len(CLASSES)} 个类别"

    # text to image: type, press Enter, wait for the grid
    box = browser.find_element(By.ID, "q")
    box.send_keys(QUERY, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .hit"))
    shown = cards()
    assert shown[0][0] == EXPECTED, shown
    expected = api(address, "/api/search", q=QUERY, k=12)["hits"]
    assert [i for i, _ in shown] == [h["image_id"] for h in expected]  # the API's order, all of it
    assert [s for _, s in shown] == [f"#{h['rank']} · 相似度 {h['score']:.3f}" for h in expected]
    first = browser.find_element(By.CSS_SELECTOR, "#grid .hit img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first))
    assert browser.find_element(By.CSS_SELECTOR, "#grid .hit .caption").text == QUERY
    # zero-shot classification of an upload: five classes, best first, as the API ranks them
    upload = files["shape4"]
    browser.find_element(By.ID, "image").send_keys(str(upload))
    browser.find_element(By.ID, "classify").click()
    wait.until(lambda d: d.find_element(By.ID, "classes").is_displayed())
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#class-list li")]
    by_api = api_classify(address, upload)
    assert len(items) == 5 and [t.split()[0] for t in items] == [c["name"] for c in by_api]
    assert browser.find_element(By.ID, "status").text == f"“{QUERY}”的前 {len(CLASSES)} 个结果"
    screenshot = tmp_path / "search_page.png"  # the query's grid and the classes of the upload
    assert browser.save_screenshot(str(screenshot))
    if os.environ.get("ERNIEVIL2_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["ERNIEVIL2_SCREENSHOT"])

    # image to image: the uploaded drawing finds itself first (the same bytes: the same embedding)
    browser.find_element(By.ID, "image-search").click()
    wait.until(lambda d: upload.name in d.find_element(By.ID, "status").text)
    shown = cards()
    assert shown[0][0] == "shape4" and shown[0][1].endswith(("1.000", "0.999")), shown

    # an undecodable upload: the API's one-line error on the page
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "image-search").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "not a decodable image" in browser.find_element(By.ID, "error").text

    # English
    browser.find_element(By.ID, "lang-toggle").click()
    assert browser.find_element(By.ID, "search-button").text == "Search"
    assert browser.title == "ERNIE-ViL 2.0 image-text search"
    # nothing blocked or missing (a CSP violation or a 404 would be a SEVERE console entry)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
              and "/api/search/image" not in e["message"]]  # the deliberate 400 above
    assert not severe, severe


def api_classify(address, path):
    boundary = "----ernievil2test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{address}api/classify?k=5", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read().decode("utf-8"))["classes"]


def test_a_missing_browser_skips_with_the_reason_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no-chromium not found \(make browser-deps"):
        need_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-chromium not found"):
        need_browser()
