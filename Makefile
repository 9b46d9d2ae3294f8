# Set-up and everyday commands.  Every target but `install` works in the virtualenv .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RELAY   := $(VENV)/.fastrelay

.PHONY: venv run test test-deps lint bench clean install fuzz fuzz-config fuzz-frames fuzz-relay \
	fuzz-relay-asan chaos

venv: $(STAMP) $(RELAY)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The compiled relay of established sessions (cffi; the Python path runs without it, but
# tests/test_fastpath.py needs it): gcc and the interpreter's headers, from apt when missing.
$(RELAY): $(STAMP) dsp_proxy/fastrelay.c dsp_proxy/fastrelay_build.py
	@missing=""; \
	command -v gcc >/dev/null 2>&1 || missing="gcc"; \
	inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	test -f "$$inc/Python.h" || missing="$$missing python3-dev"; \
	test -z "$$missing" || apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; } || true
	$(BIN)/python -m dsp_proxy.fastrelay_build
	touch $(RELAY)

run: venv
	$(BIN)/python -m dsp_proxy.demo

test: venv test-deps
	$(BIN)/python -m pytest -q

# Debian packages the tests drive for real: sshd on 127.0.0.1 (the ssh tests, with their own
# config, keys and port), logrotate (the shipped logrotate snippet, in a temporary root) and
# iproute2 (the host-crash test's two hosts are network namespaces of its own).
test-deps:
	@missing=""; \
	{ command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd; } || missing="openssh-server"; \
	command -v logrotate >/dev/null 2>&1 || test -x /usr/sbin/logrotate || \
	  missing="$$missing logrotate"; \
	command -v ip >/dev/null 2>&1 || test -x /usr/sbin/ip || test -x /sbin/ip || \
	  missing="$$missing iproute2"; \
	test -z "$$missing" || apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null; }

bench: venv
	$(BIN)/python -m bench.run

# The init script, /etc/default/dvs, the logrotate snippet, the systemd unit and the guide,
# below $(DVS_ROOT) (empty: the real root); runs update-rc.d when present.  The program itself
# is installed with pip (`pip install .`).
DVS_ROOT ?=
install:
	DVS_ROOT="$(DVS_ROOT)" sh init.d/dvs install

# The long fuzzers (bounded versions run in `make test`); each prints its figures.
fuzz: fuzz-config fuzz-frames fuzz-relay

# 10,000 mutated config files (and 1 MB shapes): only Config or ConfigError, figures printed.
fuzz-config: venv
	$(BIN)/python -m fuzz.config_fuzz --count 10000 --big

# 100,000 hostile frames from the peers' own addresses against a 3-node cluster; prints figures.
fuzz-frames: venv
	$(BIN)/python -m fuzz.frame_fuzz --frames 100000 --seconds 1500

# 1,000,000 frames through the LB host's compiled relay and the router side by side: every
# frame and every session compared; prints figures.
fuzz-relay: venv
	$(BIN)/python -m fuzz.relay_fuzz --frames 1000000

# The same 1,000,000 frames and the relay's tests (its read loop fed by a hostile peer, the
# cluster test) against dsp_proxy._fastrelay_san: fastrelay.c built with AddressSanitizer and
# UBSan (the normal module stays as it is; DSP_FASTRELAY_SANITIZED=1 makes the DSP and its
# children load the other one).  Any sanitizer report ends the run with a failure (pytest
# captures only sys.stdout/err, so the report reaches the terminal).
SAN_ENV := DSP_FASTRELAY_SANITIZED=1 PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fuzz-relay-asan: venv
	$(BIN)/python -m dsp_proxy.fastrelay_build --sanitize
	@asan=$$(gcc -print-file-name=libasan.so); test -f "$$asan" || \
	  { echo "no libasan.so for gcc (apt-get install libasan8)" >&2; exit 1; }; \
	set -e; \
	$(SAN_ENV) LD_PRELOAD="$$asan" $(BIN)/python -m fuzz.relay_fuzz --frames 1000000; \
	$(SAN_ENV) LD_PRELOAD="$$asan" $(BIN)/python -m pytest -q -p no:cacheprovider --capture=sys \
	  tests/test_fastrelay_hostile.py tests/test_fastpath.py tests/test_fastpath_node.py \
	  tests/test_fastpath_node_hostile.py tests/test_fastpath_lb.py \
	  tests/test_fastpath_lb_hostile.py

# Six healed faults under four looping clients through the LB, then 8 clients x 10,000 sendrec.
chaos: venv
	$(BIN)/python -m fuzz.chaos --sessions 20 --soak 10000
	$(BIN)/python -m fuzz.chaos --mode local --sessions 20 --soak 10000

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache dsp_proxy/_fastrelay*.so
