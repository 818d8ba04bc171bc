# edgebus: `make run` boots the default system, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench venv clean debs

$(STAMP): pyproject.toml setup.py protocols/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m drivers.accel --warm   # numba compiles the ops now, not at the first boot's first requests
	touch $(STAMP)

venv: $(STAMP)

# make run CONFIG=my-system.toml boots that config instead of the built-in default.
run: $(STAMP)
	$(PY) -m tools.build_ocr_demo   # the demo's OCR models (fetched once, cached) and labels; offline: a warning, no OCR
	$(VENV)/bin/edgebus boot --run-dir .run $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP) debs
	$(PY) -m tools.fetch_models --quiet   # the real models of the tests (cached; offline: a warning, they skip)
	@# the JavaScript reference peer's modules (zeromq ships its binaries in the npm package); no npm: its tests skip
	@if command -v npm >/dev/null; then npm ci --prefix protocols/examples/js --no-audit --no-fund --loglevel=error || \
	  echo "warning: npm ci failed; the JavaScript conformance tests will skip"; \
	else echo "warning: no npm; the JavaScript conformance tests will skip"; fi
	$(PY) -m pytest -q

# Debian packages the tests use: a real MQTT broker (mosquitto) for the uplink tests, zsh
# for the completion test; installed when missing (as root; elsewhere those tests skip
# and say why).
DEBS := mosquitto zsh
debs:
	@missing=$$(for d in $(DEBS); do dpkg -s $$d >/dev/null 2>&1 || echo $$d; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && (apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null)) ; } || \
	  echo "warning: could not install $$missing; the tests that need them will skip"

bench: $(STAMP)
	$(PY) -m tools.bench_bus
	$(PY) -m tools.bench_supervisor
	$(PY) -m tools.bench_modelstore
	$(PY) -m tools.bench_inference
	$(PY) -m tools.bench_models
	$(PY) -m tools.bench_graphs
	$(PY) -m tools.bench_streams
	$(PY) -m tools.bench_ops
	$(PY) -m tools.bench_telemetry
	$(PY) -m tools.bench_fleet

clean:
	rm -rf .run $(VENV) *.egg-info
