# make demo: set up, prepare data, train a 1,024-piece BPE tokenizer, then
#            the tiny LM for about 5 minutes on 8 simulated devices
#            (data=2 x fsdp=2 x tensor=2; configs/lm.py:demo), evaluate,
#            print a sample.
# make test: set up, run the test suite.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= runs/demo
DEMO_TOKENIZER ?= runs/demo_tokenizer
# JAX_PLATFORMS=cpu: after `make test` the venv has libtpu (the AOT planner's
# compiler), and jax would look for a TPU first, logging that it found none.
SIM8 := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: setup data demo test bench clean

# The pinned set, then this package itself (editable: no sys.path edits).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

data: setup
	$(VENV)/bin/python scripts/prepare_data.py --config=configs/lm.py:demo

# The tokenizer is trained each time (seconds; the same file each time):
# benchmarks/demo.py and benchmarks/time_to_quality.py count it too.
demo: data
	rm -rf $(DEMO_DIR)
	JAX_PLATFORMS=cpu $(VENV)/bin/python scripts/train_tokenizer.py \
	  --config=configs/lm.py:demo --vocab_size=1024 --out=$(DEMO_TOKENIZER) \
	  --overwrite
	$(SIM8) $(VENV)/bin/python scripts/train.py --config=configs/lm.py:demo \
	  --workdir=$(DEMO_DIR) \
	  --config.data.tokenizer=$(DEMO_TOKENIZER)/tokenizer.json \
	  --config.model.vocab_size=1024
	$(SIM8) $(VENV)/bin/python scripts/generate.py --workdir=$(DEMO_DIR) \
	  --prompt="ROMEO." --max_new_tokens=240 --temperature=0.8 --top_k=40

# A suite that collects nothing fails (pytest exits 5). TESTS: a subset.
TESTS ?= tests
# Test-only dependencies (torch, transformers: the Hugging Face reference).
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test-installed
	$(VENV)/bin/python -m pytest -n 2 -q $(TESTS)

bench: setup
	$(VENV)/bin/python scripts/benchmark.py --config=configs/lm.py:bench

clean:
	rm -rf $(VENV) runs .test_data
