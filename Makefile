# make fit: train the default config.  make test: run the tests.  Both set themselves up first.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist
HOST ?= 127.0.0.1
PORT ?= 6006
# one worker per core; the longest tests start first (tests/conftest.py)
PYTEST := $(PY) -m pytest -n auto --dist worksteal

.PHONY: install data browser fit test test-fast lint tensorboard bench clean

install: $(VENV)/.installed data browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's package $(1), unless $(2) is there already or apt is not: the index is updated only if the install fails
apt_get = [ -e $(2) ] || ! command -v apt-get >/dev/null || \
	  $(SUDO) apt-get install -y -q $(1) >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(1) >/dev/null; }

# Fashion-MNIST from Debian's package (the template also downloads it where there is internet)
data:
	@$(call apt_get,dataset-fashion-mnist,$(FASHION))

# Chromium, which the test of serve's web page drives (tests/test_serve.py)
browser:
	@$(call apt_get,chromium,/usr/bin/chromium)

fit: install
	$(PY) -m project fit

# the whole suite (markers: slow, gpu; gpu tests skip where torch sees no CUDA GPU)
test: install
	$(PYTEST) -q

# the edit loop: everything but the tests marked slow (processes, signals, DDP, search trials)
test-fast: install
	$(PYTEST) -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir logs --host $(HOST) --port $(PORT)

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf logs/*/ .pytest_cache .ruff_cache
