# The README's commands. `make setup` once, then `make quickstart` and `make test`.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup quickstart test test-quick bench docs

setup:
	bash scripts/setup.sh

quickstart:
	$(VENV)/bin/emsweep run workflows/quickstart.yaml

# Everything, including the slow end-to-end tests through real Ray, DeepSpeed, vLLM and W&B.
test:
	$(VENV)/bin/python -m pytest tests --durations=25

# Everything but the slow end-to-end tests (about 5 minutes).
test-quick:
	$(VENV)/bin/python -m pytest tests -m "not slow"

# Each stage against the raw library on this machine (bench/run.py; prints a table, writes bench/results/).
bench:
	PYTHONPATH=src:. $(VENV)/bin/python -m bench.run --quickstart

# The documentation site at http://127.0.0.1:8000 (tests/test_docs.py builds it with --strict).
docs:
	$(VENV)/bin/mkdocs serve
