"""Telemetry: cheap in-loop accumulators, the Prometheus collector and the HTTP endpoint."""
