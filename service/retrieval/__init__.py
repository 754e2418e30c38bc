"""GSU retrieval: for each query (candidate), the top-k keys (behaviours) by inner product.

Every strategy implements `Retriever.search(queries [B, d] float32, keys [L, d] float32, k,
context=None)` and returns `(scores [B, k] float32, indices [B, k] int64)`, best first. When
L < k the rows are padded with index -1 and score -inf; an empty history gives all padding.
Strategies are built by name (`make_retriever`), one module each:

* ``exact`` (`exact`) - the fused numba kernel of `kernels.topk_ip`; ties broken by lower index.
* ``faiss_knn``, ``numpy``, ``faiss_gpu`` (`brute_force`) - faiss's reference, the naive matmul,
  and faiss GPU brute force (only constructible with a GPU build and a GPU).
* ``sim_hard``, ``eta``, ``twin_v2`` - approximate: category search, SimHash shortlist, and the
  search of the best behaviour clusters stored at ingest.

This package knows nothing about requests or transports; bad input raises `RetrievalInputError`
(a ValueError) with a message that says what to fix.
"""

from service.retrieval.base import (
    BaseRetriever,
    DistinctKeys,
    RetrievalContext,
    RetrievalInputError,
    Retriever,
    RetrieverUnavailable,
    count_fallback,
    fallback_counts,
    padded,
    validate,
)
from service.retrieval.brute_force import FaissGpuRetriever, FaissKnnRetriever, NumpyRetriever, gpu_available
from service.retrieval.eta import EtaRetriever, simhash, simhash_planes
from service.retrieval.exact import ExactRetriever, warm_up
from service.retrieval.reference import check_against_reference, recall_at_k
from service.retrieval.sim_hard import SimHardRetriever
from service.retrieval.strategies import (
    RetrieverFactory,
    available_retrievers,
    make_retriever,
    parse_strategy,
    register_retriever,
)
from service.retrieval.twin_v2 import TwinV2Retriever

__all__ = [
    "BaseRetriever",
    "DistinctKeys",
    "EtaRetriever",
    "ExactRetriever",
    "FaissGpuRetriever",
    "FaissKnnRetriever",
    "NumpyRetriever",
    "RetrievalContext",
    "RetrievalInputError",
    "Retriever",
    "RetrieverFactory",
    "RetrieverUnavailable",
    "SimHardRetriever",
    "TwinV2Retriever",
    "available_retrievers",
    "check_against_reference",
    "count_fallback",
    "fallback_counts",
    "gpu_available",
    "make_retriever",
    "padded",
    "parse_strategy",
    "recall_at_k",
    "register_retriever",
    "simhash",
    "simhash_planes",
    "validate",
    "warm_up",
]
