"""The assembled trainers that the tutorial chapters add up to.

The names below load on first use (PEP 562), so that `from reference.data import ...` in a
chapter, or any one module, does not import every trainer and torch.distributed.checkpoint:
each process of a torchrun starts about a second sooner."""
import importlib

_EXPORTS = {"Trainer": ".trainer", "SFTTrainer": ".sft", "DPOTrainer": ".dpo",
            "GRPOTrainer": ".grpo", "configure_optimizer": ".optimizer", "TinyGPT": ".model",
            "GPTConfig": ".model"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reference' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
