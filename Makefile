# The two commands a fresh machine needs:  make run  (the daemon)  and  make test  (the suite).
# Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-postgresql bench system-deps clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) dicoogled.py serve $(ARGS)

# The tests' real peers, from Debian: DCMTK's DICOM clients, chromium for the browser tests,
# node/npm for dicoogle-client and the OHIF viewer, and PostgreSQL for the second index engine
# (the tests start their own server in a temp dir).
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(APT_INSTALL) $$missing; fi

# dicoogle-client, Dicoogle's official JavaScript client, for tests/test_dicoogle_client.py.
tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json | system-deps
	npm ci --prefix tests/js --no-audit --no-fund

# The suite, once on each index engine, both at once (most of a run is waiting for daemons and
# clients, so two share the machine's cores): SQLite in the foreground, PostgreSQL beside it with
# its output in tests/artifacts/postgresql.log, whose summary is printed at the end. Each daemon
# of the PostgreSQL run gets a fresh database on a server the tests start themselves; the tests
# that look at the SQLite files are skipped there. Fails if either run fails.
test: $(VENV)/.installed system-deps tests/js/node_modules/.package-lock.json
	@mkdir -p tests/artifacts
	@DICOOGLED_TEST_INDEX=postgresql $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) >tests/artifacts/postgresql.log 2>&1 & \
	postgresql=$$!; \
	$(PY) -m pytest $(PYTEST_ARGS); sqlite=$$?; \
	wait $$postgresql; on_postgresql=$$?; \
	echo "==== the same suite on PostgreSQL (whole output: tests/artifacts/postgresql.log)"; \
	grep -q '= short test summary info =' tests/artifacts/postgresql.log \
		&& sed -n '/= short test summary info =/,$$p' tests/artifacts/postgresql.log || tail -n 1 tests/artifacts/postgresql.log; \
	[ $$sqlite = 0 ] && [ $$on_postgresql = 0 ]

# One engine alone: the suite on SQLite is `.venv/bin/python -m pytest`; on PostgreSQL, this.
test-postgresql: $(VENV)/.installed system-deps tests/js/node_modules/.package-lock.json
	DICOOGLED_TEST_INDEX=postgresql $(PY) -m pytest $(PYTEST_ARGS)

# Orthanc with its DICOMweb plugin (bench.py) and its PostgreSQL index plugin (bench/nodes.py).
bench: $(VENV)/.installed system-deps
	@{ command -v Orthanc >/dev/null && dpkg -s orthanc-dicomweb orthanc-postgresql >/dev/null 2>&1; } || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb orthanc-postgresql; }
	$(PY) bench/bench.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
