# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the live actor-learner demo (Atari frames)
#   make test   - set up, then run every test (Rust unit/loom/proptest/multi-process + pytest)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: demo test dev venv rust-test loom pytest typecheck lint fmt clean bench bench-deps bench-quick soak

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2" "numpy>=1.23" "pytest>=8" "hypothesis>=6" "mypy>=1.10" "gymnasium>=1.0" "ale-py>=0.10"
	touch $@

# Build the Rust extension (release) into the venv, with the Python sources editable.
dev: venv
	$(VENV)/bin/maturin develop --release --quiet

demo: dev
	$(VENV)/bin/shmreplay demo $(DEMO_ARGS)

rust-test:
	cargo test --workspace --exclude shmreplay-py --release

loom:
	RUSTFLAGS="--cfg loom" cargo test -p shmreplay-core --release --lib --target-dir target/loom -- loom

pytest: dev
	$(PY) -m pytest -q tests

# The hand-written stubs must match the runtime, and the package must type-check against them.
typecheck: dev
	$(PY) -m mypy.stubtest shmreplay --ignore-missing-stub
	$(PY) -m mypy python/shmreplay

test: rust-test loom typecheck pytest

# The benchmark suite against the peers (optional extras installed here) and the limit.
bench-deps: $(VENV)/.bench-installed
$(VENV)/.bench-installed: benches/requirements.txt | venv
	$(PY) -m pip install --quiet -r benches/requirements.txt
	touch $@

bench: dev bench-deps
	$(PY) benches/run.py

bench-quick: dev bench-deps
	$(PY) benches/run.py --quick $(BENCH_ARGS)

# Reliability soak (not part of `make test`): `make soak MINUTES=10`.
MINUTES ?= 10
soak: dev
	ci/soak.sh --minutes $(MINUTES)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc -p shmreplay-core --no-deps

fmt:
	cargo fmt --all

clean:
	rm -rf target $(VENV)
