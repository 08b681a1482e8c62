# make demo  — fetch the embedded model, inspect it, evaluate it, write runs/demo/report.md
# make test  — lint (ruff), the import layers (import-linter), then the whole test suite (tiny models and the real
#              embedded model)
# make lint  — ruff check, ruff format --check and the import-linter contracts alone
# make bench — every benchmark in benchmarks/, results in benchmarks/results/
# make reproduce — every paper's headline claims re-run and judged on paired seeds (hours; resumable):
#              benchmarks/results/claims.json

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch is installed first and on its own: an unpinned torch pulls several GB of
# CUDA wheels. On a GPU machine: make setup TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-fast bench reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/upcycle demo --out runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(VENV)/bin/ruff format --check src tests benchmarks docs
	$(VENV)/bin/lint-imports

# two workers, one thread each (tests/conftest.py): the suite is mostly single-threaded small tensors
test: lint
	$(PY) -m pytest -q -n 2 --dist worksteal

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

bench: setup
	@set -e; for script in benchmarks/*.py; do [ -e "$$script" ] || { echo "no benchmarks yet"; break; }; \
		echo "== $$script"; $(PY) $$script; done

reproduce: setup
	$(PY) benchmarks/reproduce.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
