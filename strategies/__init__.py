"""Federated LoRA server strategies, one method per module, selected by name from the registry."""

from strategies.fed_sb import FedSB
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoraFAIR
from strategies.registry import get_strategy, names, register

register("fedit", FedIT)
register("ffa_lora", FFALoRA)
register("lora_fair", LoraFAIR)
register("fed_sb", FedSB)
register("fedex_lora", FedExLoRA)
register("flora", FLoRA)
register("flexlora", FlexLoRA)
register("hetlora", HetLoRA)
register("fedsa_lora", FedSALoRA)
register("fedsvd", FedSVD)

__all__ = [
    "FFALoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FedSB",
    "FedSVD",
    "FlexLoRA",
    "HetLoRA",
    "LoraFAIR",
    "get_strategy",
    "names",
    "register",
]
