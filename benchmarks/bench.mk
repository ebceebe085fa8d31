# `make bench`: taskcodec side by side with plain CompressAI, and against its own targets.
# Included from the top-level Makefile (-include benchmarks/bench.mk).
.PHONY: bench

BENCH_ARGS ?=

bench: install ## run the benchmarks (< 20 min on 2 cores): tables, benchmarks/results/*.json, BENCHMARKS.md
	PYTHONPATH="$(CURDIR)/src:$(CURDIR)" $(PY) -m benchmarks.run $(BENCH_ARGS)
