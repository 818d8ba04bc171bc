# edgebus: `make run` boots the default system, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/edgebus boot --run-dir .run

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m tools.bench_bus
	$(PY) -m tools.bench_supervisor
	$(PY) -m tools.bench_modelstore
	$(PY) -m tools.bench_inference
	$(PY) -m tools.bench_ops

clean:
	rm -rf .run $(VENV) *.egg-info
