# make demo : set up, draw a small dataset, (train,) embed it with run_infer.sh on 2 processes, score it
# make test : set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast clean-demo search-demo browser-deps


$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The demo: draw 1,200 training images with zh/en captions, train the tiny model for a few
# minutes (4 views: image-text, image-image, text-text, image-tags) in a fresh demo_out/train (a
# new run refuses a used output_dir), embed the 200-line test set with 2 processes using the
# trained checkpoint, and score it in both protocols.
demo: setup
	$(PY) tools/make_demo_data.py --out demo_out
	rm -rf demo_out/train
	PYTHON=$(PY) bash run_train.sh 0 demo_tiny
	PYTHON=$(PY) bash run_infer.sh 0,1 demo_out/train/final/infer.yaml test_file=demo_out/test.tsv
	@echo "== official protocol (line i's text <-> line i's image; chance R@1 = 0.5%) =="
	$(PY) eval_retri.py demo_out/cross_modal_embeddings.out
	@echo "== multi-caption protocol (images = distinct image ids; chance R@1 = 1%) =="
	$(PY) eval_retri.py demo_out/cross_modal_embeddings.out --protocol multi-caption --tsv demo_out/test.tsv

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf demo_out

# The search page on the demo (after `make demo`): index the demo's test images with the trained
# demo model, then serve the page on 127.0.0.1 (it prints its address; Ctrl-C stops it).
SERVE_PORT ?= 8000
search-demo: setup
	@test -f demo_out/train/final/infer.yaml || { echo "no demo model: run make demo first"; exit 1; }
	rm -rf demo_out/index
	$(VENV)/bin/ernievil2-index build demo_out/train/final/infer.yaml demo_out/test.tsv demo_out/index
	$(VENV)/bin/ernievil2-serve demo_out/index --classes demo_shapes --port $(SERVE_PORT)

# The browser test's packages (Debian): Chromium, its WebDriver and a CJK font for the screenshots.
BROWSER_PACKAGES := chromium chromium-driver fonts-wqy-microhei
browser-deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(BROWSER_PACKAGES)

# Flickr8k-CN recipe on real photos (make flickr8k / flickr8k-baseline / flickr8k-ablation)
include mk/flickr8k.mk
