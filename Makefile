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

DEMO := dataset='synthetic' model='vit-tiny-test' synthetic-train-size=5000 synthetic-test-size=1000 \
    val-size=500 device='cpu' lr=0.05

demo: $(STAMP)
	$(PY) -m fed_app.centralized --run-config "$(DEMO) epochs=3 run-dir='$(CURDIR)/results/demo/centralized'"
	$(PY) -m fed_app.centralized --run-config "$(DEMO) epochs=3 optimizer='sparse-sgdm' head='ridge' \
	    sparsity=0.9 calibration-rounds=3 fisher-samples=256 run-dir='$(CURDIR)/results/demo/sparse'"
	$(PY) -m fed_app.simulation --run-config "$(DEMO) num-clients=20 fraction-train=0.2 num-rounds=20 \
	    eval-every=5 run-dir='$(CURDIR)/results/demo/fedavg'"

# The headline job: FedAvg, K=100, C=0.1, J=4, iid, CIFAR-100, DINO ViT-S/16 (defaults in pyproject.toml)
run: $(STAMP)
	$(PY) -m fed_app.simulation --run-config "$(RUN_CONFIG)"

clean:
	rm -rf $(VENV)
