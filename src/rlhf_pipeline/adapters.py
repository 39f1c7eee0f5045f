"""Memory savers for real model sizes: LoRA adapters (through ``peft``) and gradient checkpointing.

With LoRA the frozen reference is the policy itself with its adapters switched off (``AdaptersOff``), and a
critic that starts from the reward model shares the reward model's base weights the same way: a 7B run
holds two copies of the base weights instead of four. ``merge_adapters`` folds the adapters back into the
base weights at the end, so the saved policy is an ordinary ``save_pretrained`` model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on a trained model's linear layers (``r: 0`` trains every weight instead)."""

    r: int = 0
    """Adapter rank; 0 turns LoRA off."""
    alpha: float = 16.0
    """Scale of the adapters' output: ``alpha / r``."""
    dropout: float = 0.0
    """Kept at 0 for PPO: old and new log-probs must come from the same function."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear layer but the LM head)."""

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def enabled(self) -> bool:
        """Whether LoRA is on (``r`` > 0)."""
        return self.r > 0


def transformer_of(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``: itself, a value-head model's LM, or a peft model's base."""
    model = getattr(model, "lm", model)  # ValueHeadModel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_lora(model: PreTrainedModel, settings: LoraSettings) -> nn.Module:
    """``model`` with trainable LoRA adapters on its base weights, which are frozen (in place)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=list(settings.target_modules) if isinstance(settings.target_modules, tuple)
                        else settings.target_modules, task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    logger.info("LoRA r=%d: %.2fM of %.1fM parameters train", settings.r, trainable / 1e6, total / 1e6)
    return adapted


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters: it (or, for a ``ValueHeadModel``, its ``lm``) is a peft model,
    with ``disable_adapter``."""
    return hasattr(getattr(model, "lm", model), "disable_adapter")


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` (a peft model, or a value-head model on one) as its base model, without a copy."""
    with getattr(model, "lm", model).disable_adapter():
        yield


class AdaptersOff:
    """A frozen view of a LoRA-adapted model with its adapters switched off: the base model it shares.

    Not a module of its own: the adapted model's engine owns (and places) the weights.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def merge_adapters(model: nn.Module) -> PreTrainedModel:
    """The base transformers model with the adapters folded into its weights (in place), ready to save."""
    return model.merge_and_unload() if has_adapters(model) else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (in place).

    Non-reentrant checkpointing: exact gradients, and no need for inputs that require grad (LoRA's frozen
    embeddings).
    """
    transformer = transformer_of(model)
    kwargs = {"use_reentrant": False}
    if hasattr(transformer, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
