"""New nn.Modules that transforms put into models, and the registered model types that hold them."""

from upcycle.modules.bank_sparse import GATE_MODES, SELECTIONS, BankSparseFFN, BankSparsity, bank_topk_mask
from upcycle.modules.sparse_model import UpcycleSparseConfig, UpcycleSparseForCausalLM, register

register()

__all__ = [
    "BankSparseFFN",
    "BankSparsity",
    "bank_topk_mask",
    "GATE_MODES",
    "SELECTIONS",
    "UpcycleSparseConfig",
    "UpcycleSparseForCausalLM",
    "register",
]
