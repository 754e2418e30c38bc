"""The strategy registry: build a retriever by name, with options ("eta:bits=128,shortlist=512")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.retrieval.base import Retriever
from service.retrieval.brute_force import FaissGpuRetriever, FaissKnnRetriever, NumpyRetriever
from service.retrieval.eta import EtaRetriever
from service.retrieval.exact import ExactRetriever
from service.retrieval.sim_hard import SimHardRetriever
from service.retrieval.twin_v2 import TwinV2Retriever

RetrieverFactory = Callable[..., Retriever]

_REGISTRY: dict[str, RetrieverFactory] = {
    "exact": ExactRetriever,
    "faiss_knn": FaissKnnRetriever,
    "numpy": NumpyRetriever,
    "faiss_gpu": FaissGpuRetriever,
    "sim_hard": SimHardRetriever,
    "eta": EtaRetriever,
    "twin_v2": TwinV2Retriever,
}


def register_retriever(name: str, factory: RetrieverFactory) -> None:
    """Add a strategy under `name` (e.g. "twin_v2"); names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"retriever {name!r} is already registered")
    _REGISTRY[name] = factory


def available_retrievers() -> list[str]:
    """Names accepted by `make_retriever` (faiss_gpu is listed even where it cannot be built)."""
    return sorted(_REGISTRY)


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """"eta:bits=128,shortlist=512" -> ("eta", {"bits": 128, "shortlist": 512}).

    Values are read as int, float, true/false or none when they look like one, else kept as
    strings; this is how a setting such as RANKSERVE_RETRIEVAL_STRATEGY carries options.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad retriever option {part!r} in {spec!r}: use name:key=value,key=value")
        options[key.strip()] = _literal(raw.strip())
    return name.strip(), options


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_retriever(name: str, **options: Any) -> Retriever:
    """Build the strategy `name` with its options, e.g. make_retriever("exact", device="auto").

    `name` may carry options itself ("eta:bits=128,shortlist=512", see `parse_strategy`); keyword
    options win over those.
    """
    if ":" in name:
        name, parsed = parse_strategy(name)
        options = {**parsed, **options}
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown retriever {name!r}; available: {', '.join(_REGISTRY)}") from None
    try:
        return factory(**options)
    except TypeError as exc:  # unexpected keyword
        raise ValueError(f"bad options for retriever {name!r}: {exc}") from exc
