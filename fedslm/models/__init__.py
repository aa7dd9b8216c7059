"""Base models: where they come from (packaged or local), how they load, and the LoRA adapter."""

from fedslm.models.adapter import (
    AdapterState,
    export_adapter,
    get_adapter_state,
    load_exported,
    set_adapter_state,
)
from fedslm.models.loading import LoadedModel, load_model, select_device
from fedslm.models.registry import ResolvedModel, resolve_model

__all__ = [
    "AdapterState",
    "LoadedModel",
    "ResolvedModel",
    "export_adapter",
    "get_adapter_state",
    "load_exported",
    "load_model",
    "resolve_model",
    "select_device",
    "set_adapter_state",
]
