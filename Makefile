# Each target installs what it needs into .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install test demo run centralized clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

centralized: $(STAMP)
	$(PY) -m fed_app.centralized --run-config "$(RUN_CONFIG)"

demo: $(STAMP)
	$(PY) -m fed_app.centralized --run-config "dataset='synthetic' model='vit-tiny-test' \
	    synthetic-train-size=5000 synthetic-test-size=1000 val-size=500 epochs=3 lr=0.05 \
	    run-dir='$(CURDIR)/results/demo/centralized'"

run: $(STAMP)
	$(VENV)/bin/flwr run . --stream --run-config "$(RUN_CONFIG)" \
	    --federation-config "num-supernodes=100 client-resources-num-cpus=2 client-resources-num-gpus=0.1"

clean:
	rm -rf $(VENV)
