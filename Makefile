# `make run` trains chapter 01; `make test` runs every test, notebooks included.
# Both create .venv and install the project into it the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench notebooks docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: $(STAMP)
	$(PY) tutorial/01_loop/train.py --out runs/01_loop
	$(PY) -m reference.plot runs/01_loop
	@echo "summary: runs/01_loop/summary.json  plot: runs/01_loop/curves.png"

test: $(STAMP)  ## its wall time goes to runs/make_test.json, which `make bench` reports
	$(PY) benchmarks/timed.py runs/make_test.json -- $(PY) -m pytest -q --nbval tests tutorial

lint: $(STAMP)  ## ruff: pyflakes, pycodestyle, lines of at most 100 characters
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## measured ratios and chapter runs -> benchmarks/results.json (about 20 minutes)
	$(PY) benchmarks/run.py

notebooks: $(STAMP)  ## re-execute every notebook in place (after changing a chapter)
	for nb in tutorial/*/*.ipynb; do \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done

docs: $(STAMP)  ## the README's plots, docs/NN_*.png: every notebook run with WRITE_DOCS=1
	for nb in tutorial/*/*.ipynb; do \
	  WRITE_DOCS=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --stdout "$$nb" >/dev/null \
	    || exit 1; done

clean:
	rm -rf runs .pytest_cache
