# The README's commands: `make quickstart` and `make test` on a fresh machine (each sets up what is
# missing first); `make setup` alone if you want only that.
VENV ?= .venv
SETUP_DONE := $(VENV)/.emsweep-setup-done
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup quickstart test test-quick bench docs trained-judge

setup:
	bash scripts/setup.sh

# Written by scripts/setup.sh when it finishes: a later `make quickstart` or `make test` skips it.
$(SETUP_DONE):
	bash scripts/setup.sh

# The embedded trained judge, rebuilt if its cache was cleared (about 30 s).
trained-judge: $(SETUP_DONE)
	@$(VENV)/bin/python -c "import sys; from emsweep.judge.trained import load_problem as p; sys.exit(1 if p('embedded:em-judged-lexical') else 0)" \
		|| $(VENV)/bin/python scripts/build_trained_judge.py

quickstart: trained-judge
	$(VENV)/bin/emsweep run workflows/quickstart.yaml

# Everything, including the slow end-to-end tests through real Ray, DeepSpeed, vLLM and W&B. The
# quick tests run two at a time (pytest-xdist, a file per worker): they mostly wait (Ray starting,
# leases expiring, servers answering), 38% of 2 cores busy one at a time. The slow ones each use
# both cores (finetunes of 2 workers, engines) and some time themselves, so they run one by one.
PYTEST_QUICK := $(VENV)/bin/python -m pytest tests -m "not slow" -n 2 --dist loadfile
test: trained-judge
	$(PYTEST_QUICK) --durations=10
	$(VENV)/bin/python -m pytest tests -m slow --durations=25

# Everything but the slow end-to-end tests (about 5 minutes).
test-quick: trained-judge
	$(PYTEST_QUICK)

# Each stage against the raw library on this machine (bench/run.py; prints a table, writes bench/results/).
bench:
	PYTHONPATH=src:. $(VENV)/bin/python -m bench.run --quickstart

# The documentation site at http://127.0.0.1:8000 (tests/test_docs.py builds it with --strict).
docs:
	$(VENV)/bin/mkdocs serve
