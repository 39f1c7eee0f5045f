"""Tokenisation and padding of prompt/response pairs, with the response mask that every loss uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TokenBatch:
    """Right-padded prompt + response sequences."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    response_mask: torch.Tensor  # (B, T) 1 for response tokens (EOS included), 0 for prompt and padding

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)))

    @property
    def last_index(self) -> torch.Tensor:
        """Index of the last real token of each row ``(B,)``."""
        return self.attention_mask.sum(dim=1) - 1


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of ``prompt`` + `` response`` + EOS and the prompt length, the prompt cut from the left to fit.

    Prompt and response are tokenised apart, exactly as generation sees them (the policy continues
    the prompt's tokens), so the tokens trained on are the tokens sampled.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length // 2]  # a response never crowds its prompt out entirely
    prompt_ids = prompt_ids[-(max_length - len(response_ids)):]
    return prompt_ids + response_ids, len(prompt_ids)


def collate(sequences: list[tuple[list[int], int]], pad_token_id: int) -> TokenBatch:
    """Right-pad encoded pairs into a ``TokenBatch``."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, prompt_length : len(ids)] = 1
    return TokenBatch(input_ids, attention_mask, response_mask)


def batch_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int) -> TokenBatch:
    return collate([encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)],
                   tokenizer.pad_token_id)


def masked_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens and their count.

    Token t is predicted by the logits at t-1, so the mask shifts with the labels: a prompt token
    never carries loss.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = input_ids[:, 1:]  # (B, T-1)
    mask = response_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), labels, reduction="none")  # (B, T-1)
    return (nll * mask).sum(), mask.sum()
