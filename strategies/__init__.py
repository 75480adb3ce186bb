"""Federated LoRA server strategies, one method per module, selected by name from the registry."""

from strategies.fedit import FedIT
from strategies.registry import get_strategy, names, register

register("fedit", FedIT)

__all__ = ["FedIT", "get_strategy", "names", "register"]
