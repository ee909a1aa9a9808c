# vlreason: every target sets up what it needs in a local virtualenv (.venv).
# CPU install path: torch is pinned to the 2.13.0 CPU wheel; GPU users install their own torch.
# The install is reproducible: constraints.txt pins every package it installs (`make constraints`
# re-resolves from pyproject's ranges and rewrites it).

VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-slow lint quickstart bench tokenizer constraints

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
