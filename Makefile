# Each target installs what it needs into .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install test test-fast demo miniature run centralized report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The edit loop: every test but the end-to-end runs marked slow (those still run in make test and CI)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

centralized: $(STAMP)
	FEDIT_CONFIG_FROM=make $(PY) -m fed_app.centralized --run-config "$(RUN_CONFIG)"

# The whole pipeline offline on a CPU: centralized, FedAvg (iid, non-iid) and sparse FedAvg runs, then the report
RESULTS ?= results
demo: $(STAMP)
	$(PY) -m experiments run experiments/manifests/demo.yaml --results $(RESULTS)
	$(PY) -m experiments report $(RESULTS)/demo

# The whole study rehearsed on a CPU: every shipped manifest, tuning first, on real digits (results/miniature)
miniature: $(STAMP)
	$(PY) -m experiments study --miniature --results $(RESULTS)/miniature

# The headline job: FedAvg, K=100, C=0.1, J=4, iid, CIFAR-100, DINO ViT-S/16 (defaults in pyproject.toml)
run: $(STAMP)
	FEDIT_CONFIG_FROM=make $(PY) -m fed_app.launch --run-config "$(RUN_CONFIG)"

clean:
	rm -rf $(VENV)
