# Set-up and everyday commands.  Every target depends on the virtualenv (D16).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv run test test-deps lint bench clean fuzz-frames chaos

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m dsp_proxy.demo

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q

# The ssh tests drive a real sshd on 127.0.0.1 (their own config, keys and port).
test-deps:
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd || \
	  { apt-get install -y -q openssh-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q openssh-server >/dev/null; }; }

bench: $(STAMP)
	$(BIN)/python -m bench.run

# 100,000 hostile frames from the peers' own addresses against a 3-node cluster; prints figures.
fuzz-frames: $(STAMP)
	$(BIN)/python -m fuzz.frame_fuzz --frames 100000 --seconds 1500

# Six healed faults under four looping clients through the LB, then 8 clients x 10,000 sendrec.
chaos: $(STAMP)
	$(BIN)/python -m fuzz.chaos --sessions 20 --soak 10000

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
