"""Benchmarks of taskcodec against plain CompressAI code and against its own targets (`make bench`)."""
