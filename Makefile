# `make run` trains chapter 01; `make test` runs every test, notebooks included.
# Both create .venv and install the project into it the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench notebooks clean

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
	@start=$$(date +%s); $(PY) -m pytest -q --nbval tests tutorial; status=$$?; \
	  mkdir -p runs; echo "{\"seconds\": $$(( $$(date +%s) - start )), \"exit_status\": $$status, \"date\": \"$$(date -u +%FT%TZ)\"}" > runs/make_test.json; \
	  exit $$status

lint: $(STAMP)  ## ruff: pyflakes, pycodestyle, lines of at most 100 characters
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## measured ratios and chapter runs -> benchmarks/results.json (about 6 minutes)
	$(PY) benchmarks/run.py

notebooks: $(STAMP)  ## re-execute every notebook in place (after changing a chapter)
	for nb in tutorial/*/*.ipynb; do \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done

clean:
	rm -rf runs .pytest_cache
