"""Dataset adapters (one module per source) and the prepared on-disk dataset."""

from mammocad.datasets.registry import get_adapter, list_adapters, read_cases, register_adapter

__all__ = ["get_adapter", "list_adapters", "read_cases", "register_adapter"]
