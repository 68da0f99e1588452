# The two commands: `make run` and `make test`. Each sets up what it needs on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The locks (exact versions with hashes, from pyproject.toml's ranges): requirements/dev.txt for `make run` and
# `make test` (runtime + test + bench extras), requirements/runtime.txt for the image. `make lock` refreshes both.
LOCK := requirements/dev.txt
RUNTIME_LOCK := requirements/runtime.txt
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml requirements/build.in --generate-hashes --universal \
	--python-version 3.11 --custom-compile-command "make lock" -q
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: run test install servers lint typecheck architecture deptry lock image bench clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --require-hashes -r $(LOCK) 2>&1 | grep -v "WARNING: Location" || true
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "WARNING: Location" || true
	@broken=$$($(BIN)/python -m pip check) || { echo "$$broken" >&2; exit 1; }
	@$(BIN)/python -c "import consumer, adapters, hypothesis, pytest" 
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Resolve pyproject.toml's ranges again (newest allowed versions) into both locks; the runtime lock is
# constrained by the dev lock so the image and the tests run the same versions.
lock: install
	$(UV_COMPILE) --upgrade --extra test --extra bench -o $(LOCK)
	$(UV_COMPILE) --upgrade -c $(LOCK) -o $(RUNTIME_LOCK)

# The embedded default: the sample payloads through the whole pipeline, SQLite state, and an explicit dry
# run (a dry run is never implied by a missing IPAAS_HOOK_URL: that is a configuration error).
# The state file is fresh each time so every run shows the whole story; run it twice without the
# `rm` to see dedupe at work.
run: install
	@mkdir -p .ctsync && rm -f .ctsync/run-state.db*
	CTSYNC_SOURCE=file:examples/commercetools-sample.jsonl \
	CTSYNC_STATE_URL=sqlite:///.ctsync/run-state.db \
	CTSYNC_DEAD_LETTER_URL=file:.ctsync/dead-letters.jsonl \
	IPAAS_IGNORE_CLIENT_IDS=ipaas-sync-client \
	$(BIN)/ctsync run --dry-run

lint: install
	$(BIN)/ruff check consumer adapters tests bench
	$(BIN)/ruff format --check consumer adapters tests bench

typecheck: install
	$(BIN)/mypy --strict consumer adapters

# The layers ([tool.importlinter] in pyproject.toml): the core imports no adapter, no edge, no I/O library;
# adapters take their own options; within the edge only consumer/cli/wiring.py imports adapters.
architecture: install
	$(BIN)/lint-imports --no-cache

# Declared dependencies and imports stay equal (configuration: [tool.deptry] in pyproject.toml).
deptry: install
	$(BIN)/deptry .

# deploy/Dockerfile as ctsync:0.1.0: docker when an engine answers, else buildah on a cached debootstrap base
# (tools/build-image says how). tests/integration/test_image.py builds it the same way and runs it.
image: servers
	tools/build-image ctsync:0.1.0

# The programs the suite runs as real servers (Redis, Go for pstest, Node, Java); nothing runs them before.
servers:
	@tools/install-test-servers

test: install servers lint typecheck architecture deptry
	$(BIN)/pytest -q

# Each benchmark starts the servers it needs (tansu, pstest, redis-server, commercetools-mock) and prints
# ratios against a baseline measured in the same run.
bench: install servers
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.state
	$(BIN)/python -m bench.audit
	$(BIN)/python -m bench.kafka
	$(BIN)/python -m bench.pubsub
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.backfill
	$(BIN)/python -m bench.peers

clean:
	rm -rf $(VENV) .ctsync .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis
