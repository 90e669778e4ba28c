# make demo : set up, draw a small dataset, (train,) embed it with run_infer.sh on 2 processes, score it
# make test : set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast clean-demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) tools/make_demo_data.py --out demo_out
	bash run_infer.sh 0,1 packages/configs/demo_tiny.yaml
	$(PY) eval_retri.py demo_out/cross_modal_embeddings.out
	@echo "NOTE: the demo model above has RANDOM (untrained) weights, so the table is near chance."

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf demo_out
