# Keycell: the commands a new user runs. `make demo` and `make test` work on a fresh
# machine: they bootstrap uv and the virtual environment, and `make test` installs the
# system packages the tests need (SoftHSM2, PostgreSQL) when they are missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Never let uv fetch a Python build: the machine's own Python (>= 3.11) is used.
export UV_PYTHON_DOWNLOADS := never
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
VENV := .venv
RUN := $(UV) run --frozen

.PHONY: help setup system-deps test lint bench fuzz demo clean

help:
	@echo "make demo    three cells on loopback and a breach: revoke, rotate, two partitions, heal"
	@echo "make test    install what the tests need, then run the whole suite"
	@echo "make lint    ruff, and mypy (strict on control_plane/)"
	@echo "make bench   run the benchmarks in bench/, printing JSON"
	@echo "make fuzz    the API fuzz tests, bigger: prints cases run and 5xx answers (must be 0)"
	@echo "make localstack-test   the AWS-backed suites against LocalStack (Docker)"

$(CURDIR)/.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

setup: $(VENV)/.synced

system-deps:
	@bash .ci/system-deps.sh

test: setup system-deps
	$(RUN) --group tpm pytest

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

bench: setup
	@bash .ci/system-deps.sh --bench
	$(UV) sync --frozen --group bench
	$(RUN) --group bench python -m bench

# tests/api/test_fuzz.py at FUZZ_EXAMPLES examples per operation and mode (25 in `make
# test`); each test prints a `fuzz:` line with the cases run and the 5xx answers.
FUZZ_EXAMPLES ?= 60
fuzz: setup
	KEYCELL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(RUN) pytest tests/api/test_fuzz.py -q -s \
		--timeout 3600 | grep -E "^fuzz:|passed|failed|Error"; exit $${PIPESTATUS[0]}

demo: setup
	$(RUN) keycell demo

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache

# The AWS-backed suites against LocalStack 4.14.0 instead of moto (needs Docker).
.PHONY: localstack-test
LOCALSTACK := docker compose -f localstack/docker-compose.yml
LOCALSTACK_SUITES := tests/ledger tests/keys tests/audit/test_audit_s3.py tests/deploy/test_localstack_kit.py
localstack-test: setup
	$(LOCALSTACK) up -d --wait
	AWS_ENDPOINT_URL=http://127.0.0.1:4566 $(RUN) pytest $(LOCALSTACK_SUITES) \
		-k "dynamodb or aws_kms or s3 or localstack"; status=$$?; \
		$(LOCALSTACK) down; exit $$status

# Keycell and its dependencies, built for Lambda (x86_64, Python 3.11), into the Chalice
# app's vendor/ folder: chalice.cdk ships it with every function of the AWS stacks.
.PHONY: aws-vendor
aws-vendor: setup
	rm -rf functions/api/vendor dist/keycell-*.whl
	$(UV) build --wheel --out-dir dist
	$(UV) pip install --target functions/api/vendor --python-platform x86_64-manylinux_2_28 \
		--python-version 3.11 dist/keycell-*.whl
