# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the live actor-learner demo (Atari frames)
#   make test   - set up, then run every test (Rust unit/loom/proptest/multi-process, in release
#                 and debug builds, + pytest, + the Python concurrency tests under every copy
#                 kernel the CPU supports)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: demo test dev venv examples-deps apex apex-check bench-apex rust-test rust-test-debug loom pytest test-kernels typecheck lint fmt clean bench bench-deps bench-quick bench-prioritized bench-flow bench-episodes bench-batches soak

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2" "numpy>=1.23" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6" "mypy>=1.10" "gymnasium>=1.0" "ale-py>=0.10" "rich>=13"
	touch $@

# Build the Rust extension (release) into the venv, with the Python sources editable. The
# `test-hooks` feature adds the hooks that tests/ uses to stop a writer inside a copy.
dev: venv
	$(VENV)/bin/maturin develop --release --features test-hooks --quiet

demo: dev
	$(VENV)/bin/shmreplay demo $(DEMO_ARGS)

# Rust tests run under cargo-nextest where it is installed: each test in its own process, and
# one that hangs is killed (.config/nextest.toml) instead of stalling the run. Nextest does not
# run doc tests, so `cargo test --doc` follows it. Without nextest, `cargo test` runs all of
# them, doc tests included, with no per-test timeout.
RUST_TESTS := --workspace --exclude shmreplay-py
# $(1): cargo profile flags; $(2): non-empty to run the doc tests too.
define run_rust_tests
	@if cargo nextest --version >/dev/null 2>&1; then \
		echo "cargo nextest run $(RUST_TESTS) $(1)" && \
		cargo nextest run $(RUST_TESTS) $(1) && \
		if [ -n "$(2)" ]; then \
			echo "cargo test $(RUST_TESTS) $(1) --doc" && \
			cargo test $(RUST_TESTS) $(1) --doc; \
		fi; \
	else \
		echo "cargo-nextest is not installed: cargo test $(RUST_TESTS) $(1) (no per-test timeout)" && \
		cargo test $(RUST_TESTS) $(1); \
	fi
endef

rust-test:
	$(call run_rust_tests,--release,doc)

# The same tests in a debug build: debug assertions and integer overflow checks are on.
rust-test-debug:
	$(call run_rust_tests,)

loom:
	RUSTFLAGS="--cfg loom" cargo test -p shmreplay-core --release --lib --target-dir target/loom -- loom

# examples-deps: tests/test_apex_example.py runs the Ape-X example (JAX) end to end.
pytest: dev examples-deps
	$(PY) -m pytest -q tests

# The multi-process tests again under every copy kernel this CPU can run, each forced in turn
# (`words`, the portable one, included), so that every kernel is exercised on every machine.
test-kernels: dev
	@for kernel in $$($(PY) -c 'import shmreplay._core as c; print(c.kernels()["available"].replace(",", " "))'); do \
		echo "SHMREPLAY_COPY_KERNEL=$$kernel pytest tests/test_concurrency.py tests/test_recovery.py" && \
		SHMREPLAY_COPY_KERNEL=$$kernel $(PY) -m pytest -q tests/test_concurrency.py tests/test_recovery.py || exit 1; \
	done

# The hand-written stubs must match the runtime, and the package must type-check against them.
typecheck: dev
	$(PY) -m mypy.stubtest shmreplay --ignore-missing-stub
	$(PY) -m mypy python/shmreplay

test: rust-test rust-test-debug loom typecheck pytest test-kernels

# The Ape-X DQN example (examples/apex_dqn.py): its extra (`shmreplay[examples]`: JAX, optax,
# matplotlib) installed into the venv, then a run on CartPole-v1 until a mean return of 475.
examples-deps: $(VENV)/.examples-installed
$(VENV)/.examples-installed: pyproject.toml | venv
	$(PY) -m pip install --quiet $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['examples']))")
	touch $@

APEX_ARGS ?=
apex: dev examples-deps
	$(PY) examples/apex_dqn.py $(APEX_ARGS)

# CI's learning check: 90 s of CartPole must end at least 5x above a random policy's return.
apex-check: dev examples-deps
	$(PY) examples/apex_dqn.py --minutes 1.5 --beat-random 5 --plot "" $(APEX_ARGS)

# examples/apex_dqn.py timed: shmreplay against a single-process NumPy buffer, 3 seeds, + Pong.
bench-apex: dev examples-deps
	$(PY) benches/apex.py $(BENCH_ARGS)

# The benchmark suite against the peers (optional extras installed here) and the limit.
bench-deps: $(VENV)/.bench-installed
$(VENV)/.bench-installed: benches/requirements.txt | venv
	$(PY) -m pip install --quiet -r benches/requirements.txt
	touch $@

bench: dev bench-deps
	$(PY) benches/run.py

bench-quick: dev bench-deps
	$(PY) benches/run.py --quick $(BENCH_ARGS)

# Prioritized replay against cpprb (benches/README.md#prioritized-replay): about 5 minutes.
bench-prioritized: dev bench-deps
	$(PY) benches/prioritized.py $(BENCH_ARGS)

# Flow control: limiter overhead, Queue() against multiprocessing.Queue and faster-fifo
# (benches/README.md#flow-control): about 5 minutes.
bench-flow: dev bench-deps
	$(PY) benches/flow.py $(BENCH_ARGS)

# Episode streams: EpisodeBuffer's sample, sample_sequences and step against the gather limit
# and cpprb, a concurrent run that checks every item, the memory table
# (benches/README.md#episode-streams): about 8 minutes, 7.2 GB in /dev/shm at a time.
bench-episodes: dev bench-deps
	$(PY) benches/episodes.py $(BENCH_ARGS)

# A learner loop with batches() against plain sample() calls
# (benches/README.md#prefetching-batches): about 1 minute.
bench-batches: dev
	$(PY) benches/batches.py $(BENCH_ARGS)

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
