"""Ingest: vLLM OTLP trace files → columnar per-step tables."""
