"""Forward passes over response positions: the one way to read a model's log-probs and values of responses.

PPO (old, new and reference log-probs, values, RM scores), PPO-ptx, SFT training and validation and the
evaluation's KL and perplexity all read a causal LM through ``ResponseForward``:

- **The model's own forward.** Logits always come from calling the model (a transformers model, a peft model,
  a DeepSpeed engine or an ``AdaptersOff`` view), never from applying its LM head to hidden states by hand:
  architectures post-process the head's output inside ``forward`` (Gemma-2's ``final_logit_softcapping``,
  Granite's ``logits_scaling``, Cohere's ``logit_scale``), and a bare head would silently give other numbers.
  Only the positions that predict a response token go through the head, through transformers'
  ``logits_to_keep`` (an int keeps the last positions; a 1-D tensor keeps those sequence positions).
- **Packed or padded.** Packed, a pass lays its rows' real tokens into bins (``PackedLayout``) with position ids
  restarting at each row, so that transformers confines attention to each row and every token gets the padded
  pass's output while padding is not computed. A bin keeps the union of its predicting positions over bins.
- **Temperature.** Rollouts are sampled from ``softmax(logits / T)``; PPO's ratio, KL penalty and entropy must
  read the same distribution, so the policy and reference logits are divided by the sampling temperature (as
  OpenRLHF and TRL's PPO do). The top-p filter is not applied: like those, the objective reads the tempered
  distribution over the whole vocabulary.
"""

from __future__ import annotations

import torch

from rlhf_pipeline.training.batching import PackedLayout, TokenBatch


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as ``generate`` counts them ``(B, T)``."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def gather_tokens(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) read from a log-softmax over the vocabulary ``(..., V)`` -> ``(...)``."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` ``(..., V)`` -> ``(...)``, in fp32."""
    return gather_tokens(torch.log_softmax(logits.float(), dim=-1), tokens)


class ResponseForward:
    """One forward pass over rows whose last ``R`` columns hold responses, padded or packed.

    ``sequences``/``attention_mask``/``position_ids`` are ``(B, P + R)``; ``response_mask`` is ``(B, R)`` and
    marks the response tokens (EOS included). Each row's real tokens must be contiguous: left-padded prompts
    with right-padded responses (a rollout buffer) or right-padded rows with ``P = 0`` (``of_tokens``).
    Raises ``ValueError`` when a row's first real token is a response token (nothing predicts it). The
    ``token_*`` methods return outputs flat ``(K, ...)`` for the K response tokens, in row-major order over the
    response mask; ``scatter`` puts a flat ``(K,)`` tensor back into ``(B, R)`` with zeros elsewhere.
    """

    def __init__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 response_mask: torch.Tensor, packed: bool):
        self.shape = response_mask.shape
        self.prompt_width = sequences.shape[1] - response_mask.shape[1]
        mask = response_mask.bool()
        self.rows, self.cols = mask.nonzero(as_tuple=True)
        self.tokens = sequences[:, self.prompt_width:][mask]
        self.mask, self.packed = mask, packed
        first_real = attention_mask.bool().long().argmax(dim=1)  # column of each row's first real token
        offsets = self.prompt_width + self.cols - first_real[self.rows]  # each response token's place in its row
        if (offsets == 0).any():
            raise ValueError("ResponseForward: a row starts with a response token, which nothing predicts; "
                             "every row needs at least one prompt token (e.g. BOS)")
        if not packed:
            self.inputs = {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}
            self.last = mask.sum(dim=1) - 1
            return
        real = attention_mask.bool()
        layout = PackedLayout.of(attention_mask)
        self.inputs = {"input_ids": layout.pack(sequences, real), "attention_mask": None,
                       "position_ids": layout.positions()}
        self.predictors = layout.starts[self.rows] + offsets - 1  # the token before a response token predicts it
        self.last = layout.starts + layout.lengths - 1
        self.bin_width = layout.width

    @classmethod
    def of(cls, batch, packed: bool) -> ResponseForward:
        """Over a rollout buffer (``Experience`` or a selection of it)."""
        return cls(batch.sequences, batch.attention_mask, batch.position_ids, batch.response_mask, packed)

    @classmethod
    def of_tokens(cls, batch: TokenBatch, packed: bool) -> ResponseForward:
        """Over right-padded prompt + response rows (a ``TokenBatch`` before packing)."""
        return cls(batch.input_ids, batch.attention_mask, positions(batch.attention_mask), batch.response_mask, packed)

    @property
    def computed_tokens(self) -> int:
        return self.inputs["input_ids"].numel()

    def token_logits(self, model, temperature: float = 1.0) -> torch.Tensor:
        """The model's logits that predict each response token, divided by ``temperature`` ``(K, V)`` fp32."""
        if not self.packed:
            total, width = self.inputs["input_ids"].shape[1], self.shape[1]
            keep = min(width + 1, total)  # position t-1 predicts token t
            skipped = width - (keep - 1)  # with P = 0 the first column has no position before it (never a response)
            logits = model(**self.inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1]
            logits = logits[self.mask[:, skipped:]]
        else:
            bins, columns = self.predictors.div(self.bin_width, rounding_mode="floor"), self.predictors % self.bin_width
            kept = torch.unique(columns)  # sorted: the union over bins of the positions to read
            logits = model(**self.inputs, logits_to_keep=kept, use_cache=False).logits  # (bins, len(kept), V)
            logits = logits[bins, torch.searchsorted(kept, columns)]
        return logits.float() / temperature if temperature != 1.0 else logits.float()

    def token_logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        """log π(token) of each response token under ``softmax(logits / temperature)`` ``(K,)``."""
        return token_logprobs(self.token_logits(model, temperature), self.tokens)

    def token_values(self, value_model) -> torch.Tensor:
        """V(s_t) for each response token, read where the token is predicted ``(K,)``."""
        values = self.forward_values(value_model)
        if not self.packed:
            return values[:, self.prompt_width - 1 : -1][self.mask]
        return values.reshape(-1)[self.predictors]

    def last_values(self, value_model) -> torch.Tensor:
        """The value head at each row's last response token (its EOS, or the last one at the cap) ``(B,)``."""
        values = self.forward_values(value_model)
        if not self.packed:
            return values[:, self.prompt_width:].gather(1, self.last.clamp(min=0).unsqueeze(1)).squeeze(1)
        return values.reshape(-1)[self.last]

    def forward_values(self, value_model) -> torch.Tensor:
        values, _ = value_model(self.inputs["input_ids"], self.inputs["attention_mask"],
                                position_ids=self.inputs["position_ids"])
        return values.float()

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros(self.shape)
        out[self.rows, self.cols] = flat
        return out


def response_logprob_sums(model, batch: TokenBatch, packed: bool = True,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's response tokens and their count, ``(B,)`` each (fp32)."""
    forward = ResponseForward.of_tokens(batch, packed)
    sums = forward.scatter(forward.token_logprobs(model, temperature)).sum(dim=1)
    return sums, forward.mask.sum(dim=1).float()


def masked_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens under full-sequence ``logits`` ``(B, T, V)`` (the
    model's own output), and their count. For losses that already hold every position's logits (the reward
    model's LM term, whose values need the same pass); elsewhere use ``ResponseForward``.

    Token t is predicted by the logits at t-1, so the mask shifts with the labels: a prompt token never
    carries loss.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = input_ids[:, 1:]  # (B, T-1)
    mask = response_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), labels, reduction="none")  # (B, T-1)
    return (nll * mask).sum(), mask.sum()
