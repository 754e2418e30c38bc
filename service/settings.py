"""Service settings: one pydantic-settings model, from the environment plus an optional YAML file.

Environment variables use the prefix `RANKSERVE_` and `__` for nesting
(`RANKSERVE_FEATURE_STORE__READ_TIMEOUT_S=0.2`). `REDIS_URL` and `REDIS_CLUSTER_NODES` are read
as well, since every Redis deployment already sets them. `RANKSERVE_CONFIG=settings.yaml` adds a
YAML file (environment wins over YAML).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from feature_store.store import FeatureStoreConfig
from service.experiments.faults import parse_fault
from service.observability.logging_setup import LOG_LEVELS

# OTEL_TRACES_SAMPLER values and the share of root traces they keep (None: read OTEL_TRACES_SAMPLER_ARG)
_OTEL_SAMPLERS: dict[str, float | None] = {
    "always_on": 1.0, "always_off": 0.0, "traceidratio": None,
    "parentbased_always_on": 1.0, "parentbased_always_off": 0.0, "parentbased_traceidratio": None,
}


def otel_standard_env(environ: Mapping[str, str], already_set: set[str]) -> dict[str, Any]:
    """Tracing settings from the standard OTEL_* variables, for those not in `already_set`.

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as given; OTEL_EXPORTER_OTLP_ENDPOINT is a base URL,
    to which http/protobuf appends /v1/traces. Unknown samplers or protocols are left to fail
    validation with the setting's own message.
    """
    out: dict[str, Any] = {}
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and "otel_protocol" not in already_set:
        out["otel_protocol"] = protocol
    effective_protocol = out.get("otel_protocol", "grpc")
    if "otel_endpoint" not in already_set:
        if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            out["otel_endpoint"] = environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        elif environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            base = environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
            out["otel_endpoint"] = base.rstrip("/") + "/v1/traces" if effective_protocol == "http/protobuf" else base
    if environ.get("OTEL_SERVICE_NAME") and "otel_service_name" not in already_set:
        out["otel_service_name"] = environ["OTEL_SERVICE_NAME"]
    sampler = environ.get("OTEL_TRACES_SAMPLER")
    if sampler and "otel_sample_ratio" not in already_set:
        name = sampler.strip().lower()
        if name not in _OTEL_SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported; use one of {sorted(_OTEL_SAMPLERS)}")
        ratio = _OTEL_SAMPLERS[name]
        out["otel_sample_ratio"] = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0") if ratio is None else ratio
    return out


def available_cpus() -> int:
    """CPUs this process may use: the cgroup CPU quota (containers) or the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(float(quota) / float(period)))
    except (OSError, ValueError):
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the server. Defaults run the demo on one machine."""

    # hide_input_in_errors: a bad value must not be echoed into logs (REDIS_URL and the admin token
    # are secrets; tests/e2e/test_secrets_not_logged.py)
    model_config = SettingsConfigDict(
        env_prefix="RANKSERVE_", env_nested_delimiter="__", extra="forbid", hide_input_in_errors=True
    )

    # models
    model_dir: Path = Field(default=Path("bundles"), description="bundles live in MODEL_DIR/<name>/<version>/")
    model_name: str | None = Field(default=None, description="bundle name to serve (default: the only one)")
    scorer_runtime: Literal["bundle", "onnx", "torchscript"] = Field(
        default="bundle",
        description="scorer runtime: 'bundle' uses each bundle's own choice (rankserve export --scorer-runtime)",
    )
    execution_provider: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="ONNX Runtime provider")
    scorer_threads: int | None = Field(default=None, ge=1, description="intra-op threads (default: available CPUs)")
    scorer_batch_wait_ms: float = Field(
        default=0.0, ge=0, le=100,
        description="cross-request micro-batching for the CUDA provider: how long the first request of a batch "
        "waits for others to score with it in one call (0: off, each request scored alone; suggested <= 2)",
    )
    scorer_batch_max_candidates: int = Field(
        default=4096, ge=1,
        description="with scorer_batch_wait_ms > 0: candidates of one batched scorer call (a larger request is "
        "scored alone)",
    )
    poll_interval_s: float = Field(default=10.0, ge=0, description="scan MODEL_DIR for new versions (0: never)")
    verify_bundles: bool = Field(default=True, description="check every file's sha256 before loading")

    # retrieval
    retrieval_strategy: str = Field(default="exact", description="GSU strategy (service/retrieval.py registry)")
    retrieval_device: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="faiss GPU when available")

    # fusion overrides (default: the bundle's)
    fusion_weights: dict[str, float] | None = None
    fusion_transforms: dict[str, str] | None = None

    # request limits
    default_top_n: int = Field(default=100, ge=1)
    max_top_n: int = Field(default=1000, ge=1)
    max_candidates: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest accepted request body")
    request_timeout_s: float = Field(default=1.0, gt=0, description="deadline of one rank call")
    max_waiting_requests: int = Field(
        default=64, ge=1,
        description="requests in progress (from arrival) beyond which new ones are refused at once with 503 / "
        "RESOURCE_EXHAUSTED and Retry-After, before any feature fetch",
    )
    fetch_budget_s: float = Field(default=0.1, gt=0, description="beyond this, rank without store features")

    # feature store
    feature_store: FeatureStoreConfig = Field(default_factory=FeatureStoreConfig)

    # transports
    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="0 disables gRPC")
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    drain_timeout_s: float = Field(default=10.0, ge=0, description="graceful shutdown deadline")

    # experiments and admin
    experiments_file: Path | None = Field(
        default=None, description="experiment arms and shadows (YAML, docs/EXPERIMENTS.md); unset: one arm 'default'"
    )
    experiments_poll_interval_s: float = Field(
        default=2.0, ge=0, description="re-read the experiments file when it changes (0: only on admin reload)"
    )
    admin_token: SecretStr | None = Field(default=None, description="bearer token of admin endpoints (off if unset)")

    # the event log (POST /v1/events, gRPC PushEvents; `rankserve consume` applies it)
    events_token: SecretStr | None = Field(
        default=None, description="bearer token of the event endpoints, not the admin token (off if unset)"
    )
    event_shards: int = Field(default=8, ge=1, le=1024, description="shard streams; the consumers' --shards")
    event_stream_maxlen: int = Field(default=1_000_000, ge=1000, description="entries kept per shard (approximate)")
    max_events_per_request: int = Field(default=1000, ge=1, description="events of one POST /v1/events or PushEvents")

    # shadow traffic (docs/EXPERIMENTS.md)
    shadow_queue_size: int = Field(default=64, ge=1, description="jobs waiting per shadow; beyond, dropped and counted")
    shadow_timeout_s: float = Field(default=1.0, gt=0, description="a shadow slower than this is counted as a timeout")
    shadow_threads: int = Field(default=1, ge=1, description="ONNX Runtime intra-op threads of each shadow scorer")
    shadow_nice: int = Field(default=0, ge=0, le=19, description="nice increment of shadow threads (Linux)")
    shadow_chunk: int = Field(default=16, ge=2, description="candidates per shadow step (retrieval + scoring)")
    shadow_yield: bool = Field(default=True, description="start a shadow step only when no request is being ranked")
    shadow_cpu_share: float = Field(
        default=0.1, gt=0, le=1, description="at most this share of wall time runs shadow steps (all shadows)"
    )
    shadow_quiet_ms: float = Field(
        default=10.0, ge=0, description="with shadow_yield: how long no request must have been ranked before a step"
    )
    shadow_sink: Literal["jsonl", "redis", "none"] = Field(default="jsonl", description="where comparisons go")
    shadow_sink_dir: Path = Field(default=Path("shadow-sink"), description="directory of the rotating JSONL sink")
    shadow_sink_max_bytes: int = Field(default=64 << 20, ge=4096, description="rotate the JSONL file beyond this")
    shadow_sink_max_files: int = Field(default=5, ge=1, description="JSONL files kept, the live one included")
    shadow_sink_requests: bool = Field(default=True, description="record each request in the sink (for replay)")
    shadow_stream_url: str | None = Field(default=None, description="Redis of the stream sink (default: REDIS_URL)")
    shadow_stream_key: str = Field(default="rankserve:shadow", description="stream key of the Redis sink")
    shadow_stream_maxlen: int = Field(default=100_000, ge=1, description="approximate stream length cap (MAXLEN ~)")
    shadow_fault: str | None = Field(
        default=None,
        description="TESTING AID ONLY: make shadows slow or failing: 'sleep:10x', 'raise', 'slow=sleep:10x,bad=raise'",
    )

    # observability
    log_level: str = "INFO"
    json_logs: bool = True
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP collector to trace requests to (e.g. http://otel-collector:4317); unset: no tracing",
    )
    otel_protocol: Literal["grpc", "http/protobuf"] = Field(
        default="grpc", description="OTLP transport; for http/protobuf give the full URL ending in /v1/traces"
    )
    otel_service_name: str = Field(default="rankserve", min_length=1, description="service.name of the spans")
    otel_sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="share of requests traced unless the caller's traceparent decides"
    )
    otel_export_timeout_s: float = Field(default=5.0, gt=0, description="deadline of one span export call")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        level = v.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return level

    @field_validator("fusion_weights")
    @classmethod
    def _finite_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            for task, w in value.items():
                if w != w or abs(w) == float("inf"):
                    raise ValueError(f"fusion weight of {task!r} must be finite")
        return value

    @field_validator("shadow_fault")
    @classmethod
    def _valid_fault(cls, value: str | None) -> str | None:
        if value:
            parse_fault(value)  # raises ValueError saying what is wrong
        return value

    @model_validator(mode="before")
    @classmethod
    def _redis_env(cls, data: Any) -> Any:
        """Plain REDIS_URL / REDIS_CLUSTER_NODES / REDIS_MODE fill the store config unless it is set
        explicitly (the same variables the command-line tools read)."""
        if not isinstance(data, dict):
            return data
        store = data.get("feature_store")
        store = dict(store) if isinstance(store, dict) else ({} if store is None else store)
        if isinstance(store, dict):
            if os.environ.get("REDIS_URL") and "url" not in store:
                store["url"] = os.environ["REDIS_URL"]
            if os.environ.get("REDIS_CLUSTER_NODES") and "cluster_nodes" not in store:
                store["cluster_nodes"] = os.environ["REDIS_CLUSTER_NODES"]
            if os.environ.get("REDIS_MODE") and "mode" not in store:
                store["mode"] = os.environ["REDIS_MODE"]
            data = {**data, "feature_store": store}
        return data

    @model_validator(mode="before")
    @classmethod
    def _otel_env(cls, data: Any) -> Any:
        """The standard OpenTelemetry variables fill the tracing settings that RANKSERVE_OTEL_* leave unset."""
        if not isinstance(data, dict):
            return data
        return {**otel_standard_env(os.environ, set(data)), **data}

    @model_validator(mode="after")
    def _store_deadline_within_budget(self) -> Settings:
        """The store's own deadline must end inside the fetch budget, so the store's typed,
        retriable errors (not a cancelled await) are what degraded mode sees."""
        if self.feature_store.request_timeout_s > self.fetch_budget_s:
            self.feature_store = self.feature_store.model_copy(update={"request_timeout_s": self.fetch_budget_s})
        return self

    @property
    def threads(self) -> int:
        return self.scorer_threads or available_cpus()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = os.environ.get("RANKSERVE_CONFIG")
        if yaml_file:
            if not os.path.isfile(yaml_file):  # a mistyped path must not start a server on the defaults
                raise FileNotFoundError(f"RANKSERVE_CONFIG={yaml_file!r} is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        sources.append(file_secret_settings)
        return tuple(sources)


# read by other parts of rankserve than the server's settings
_OTHER_VARIABLES = frozenset({"RANKSERVE_CONFIG", "RANKSERVE_DATA_ROOT"})


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """RANKSERVE_* variables that name no setting (a typo such as RANKSERVE_WORKER): the
    environment source ignores them silently, so the server warns about them at start."""
    env = os.environ if environ is None else environ
    fields = set(Settings.model_fields)
    return sorted(name for name in env if name.startswith("RANKSERVE_") and name not in _OTHER_VARIABLES
                  and name[len("RANKSERVE_"):].split("__")[0].lower() not in fields)

