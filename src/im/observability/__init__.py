"""Seeing inside a running node: Prometheus metrics, OpenTelemetry traces exported to Zipkin, structured
logs, and liveness/readiness (docs/operations.md).

A leaf every layer may import: it imports only the configuration, the model and third-party libraries.
Everything here is cheap when off: hot paths test a plain attribute before doing any work.
"""
