# orz_fast: make test | make bench | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orz_fast-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test bench lint clean

install: $(STAMP)

# Keep an importable torch; otherwise install the pinned CPU-friendly release
# before anything else, so no dependency pulls an unpinned (CUDA) torch.
$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.*"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest tests/

bench: install
	$(PY) -m pytest benchmarks/

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info orz_fast/_C*.so
