"""The assembled trainers that the tutorial chapters add up to."""
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .model import GPTConfig, TinyGPT
from .optimizer import configure_optimizer
from .sft import SFTTrainer
from .trainer import Trainer

__all__ = ["Trainer", "SFTTrainer", "DPOTrainer", "GRPOTrainer", "configure_optimizer", "TinyGPT",
           "GPTConfig"]
