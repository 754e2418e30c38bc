"""The standard OpenTelemetry variables configure tracing; the RANKSERVE_OTEL_* ones override them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("OTEL_", "RANKSERVE_OTEL_")):
            monkeypatch.delenv(name)


def test_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ranker-eu")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    s = Settings()
    assert (s.otel_endpoint, s.otel_service_name, s.otel_sample_ratio, s.otel_protocol) == (
        "http://collector:4317", "ranker-eu", 0.25, "grpc")


def test_http_protobuf_base_endpoint_gets_the_traces_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    s = Settings()
    assert (s.otel_endpoint, s.otel_protocol) == ("http://collector:4318/v1/traces", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom")
    assert Settings().otel_endpoint == "http://traces:4318/custom"  # the signal's own endpoint, as given
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert Settings().otel_sample_ratio == 0.0


def test_rankserve_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "standard")
    monkeypatch.setenv("RANKSERVE_OTEL_ENDPOINT", "http://mine:4317")
    monkeypatch.setenv("RANKSERVE_OTEL_SERVICE_NAME", "mine")
    s = Settings()
    assert (s.otel_endpoint, s.otel_service_name) == ("http://mine:4317", "mine")


def test_unknown_sampler_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    with pytest.raises(ValidationError, match="OTEL_TRACES_SAMPLER='jaeger_remote' is not supported"):
        Settings()


def test_no_variables_no_tracing() -> None:
    assert Settings().otel_endpoint is None
