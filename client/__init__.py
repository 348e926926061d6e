"""gRPC clients of clinfer models on Triton: the batch job's and real-time queries."""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Names are imported on first use, so that ``clinfer.workers`` can import
# ``clinfer.client.triton`` without loading the query client, which imports workers.
_EXPORTS = {
    "Client": "clinfer.client.query",
    "AsyncClient": "clinfer.client.query",
    "ServedModel": "clinfer.client.query",
    "load_emr": "clinfer.client.query",
    "prepare_study": "clinfer.client.query",
    "QueryResult": "clinfer.client.results",
    "InstanceScore": "clinfer.client.results",
    "QueryTiming": "clinfer.client.results",
    "SkippedFile": "clinfer.client.results",
    "ModelSpec": "clinfer.client.triton",
    "TritonModelClient": "clinfer.client.triton",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clinfer.client' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
