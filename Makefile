# vlreason: every target sets up what it needs in a local virtualenv (.venv).
# CPU install path: torch is pinned to the 2.13.0 CPU wheel; GPU users install their own torch.

VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint quickstart bench tokenizer

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check vlreason tests benchmarks scripts rewards

test: lint
	$(BIN)/pytest

quickstart: $(STAMP)
	$(BIN)/vlreason quickstart --out quickstart

bench: $(STAMP)
	$(BIN)/python benchmarks/reward_throughput.py --json benchmarks/results/reward_throughput.json
	$(BIN)/python benchmarks/grpo_step_vs_trl.py --json benchmarks/results/grpo_step_vs_trl.json

tokenizer: $(STAMP)
	$(BIN)/python scripts/build_tiny_tokenizer.py
