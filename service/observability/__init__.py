"""Metrics (Prometheus), tracing (OpenTelemetry) and structured logs."""
