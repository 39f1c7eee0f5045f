"""Forward passes over response positions: the one way to read a model's log-probs and values of responses.

PPO (old, new and reference log-probs, values, RM scores), PPO-ptx, SFT training and validation, reward-model
training and scoring (values at the last token, the LM term) and the evaluation's KL and perplexity all read a
model through ``ResponseForward``:

- **The model's own forward.** Logits always come from calling the model (a transformers model, a peft model,
  a DeepSpeed engine or an ``AdaptersOff`` view), never from applying its LM head to hidden states by hand:
  architectures post-process the head's output inside ``forward`` (Gemma-2's ``final_logit_softcapping``,
  Granite's ``logits_scaling``, Cohere's ``logit_scale``), and a bare head would silently give other numbers.
  The head runs only where transformers' ``logits_to_keep`` asks: padded rollouts, the positions from the
  last prompt token on; packed rows, the columns that predict a response token in any bin; right-padded rows
  without a prompt block (SFT, RM, PPO-ptx unpacked), every position. A model that ignores ``logits_to_keep``
  is refused rather than read at the wrong positions.
- **Packed or padded.** Packed, a pass lays its rows' real tokens into bins (``PackedLayout``) with position ids
  restarting at each row, so that transformers confines attention to each row and every token gets the padded
  pass's output while padding is not computed. ``logits_to_keep`` selects the same columns in every bin, so a
  packed pass computes logits at every column that predicts a response token in any bin.
- **Temperature.** Rollouts are sampled from ``softmax(logits / T)``; PPO's ratio, KL penalty and entropy must
  read the same distribution, so the policy and reference logits are divided by the sampling temperature (as
  OpenRLHF and TRL's PPO do). Neither the top-p filter nor the repetition penalty is applied: like those,
  the objective reads the tempered distribution over the whole vocabulary.
"""

from __future__ import annotations

import torch

from rlhf_pipeline.formatting import EncodedRows
from rlhf_pipeline.training.batching import PackedLayout, TokenBatch, score_encoded


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
    marks the response tokens (EOS included). Each row's real tokens must be contiguous and end with its
    response: left-padded prompts with right-padded responses (a rollout buffer) or right-padded rows with
    ``P = 0`` (``of_tokens``). Raises ``ValueError`` when a row's first real token is a response token (nothing
    predicts it). The ``token_*`` methods return outputs flat ``(K, ...)`` for the K response tokens, in
    row-major order over the response mask; ``scatter`` puts a flat ``(K,)`` tensor back into ``(B, R)``.
    """

    def __init__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 response_mask: torch.Tensor, packed: bool):
        self.shape = response_mask.shape
        prompt_width = sequences.shape[1] - response_mask.shape[1]
        mask = response_mask.bool()
        self.rows, self.cols = mask.nonzero(as_tuple=True)
        self.tokens = sequences[:, prompt_width:][mask]
        self.packed = packed
        real = attention_mask.bool()
        first_real = real.long().argmax(dim=1)  # column of each row's first real token
        offsets = prompt_width + self.cols - first_real[self.rows]  # each response token's place in its row
        if (offsets == 0).any():
            raise ValueError("ResponseForward: a row starts with a response token, which nothing predicts; "
                             "every row needs at least one prompt token (e.g. BOS)")
        lengths = real.sum(dim=1)
        if not packed:
            self.inputs = {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids}
            width = sequences.shape[1]
            self.predictors = self.rows * width + prompt_width + self.cols - 1  # flat (B * (P + R),)
            self.last = torch.arange(len(lengths), device=lengths.device) * width + first_real + lengths - 1
            self.row_width = width
            return
        layout = PackedLayout.of(attention_mask)
        self.inputs = {"input_ids": layout.pack(sequences, real), "attention_mask": None,
                       "position_ids": layout.positions()}
        self.predictors = layout.starts[self.rows] + offsets - 1  # the token before a response token predicts it
        self.last = layout.starts + layout.lengths - 1
        self.row_width = layout.width

    @classmethod
    def of(cls, batch, packed: bool) -> ResponseForward:
        """Over a rollout buffer: an ``rl.experience.Experience`` or a selection of it."""
        return cls(batch.sequences, batch.attention_mask, batch.position_ids, batch.response_mask, packed)

    @classmethod
    def of_tokens(cls, batch: TokenBatch, packed: bool) -> ResponseForward:
        """Over right-padded prompt + response rows (``collate``)."""
        return cls(batch.input_ids, batch.attention_mask, positions(batch.attention_mask), batch.response_mask, packed)

    @property
    def computed_tokens(self) -> int:
        """Positions the pass computes: the padded batch's, or the bins' (padding only in each bin's tail)."""
        return self.inputs["input_ids"].numel()

    def keep(self) -> int | torch.Tensor:
        """transformers' ``logits_to_keep`` for this pass: the last positions (padded) or the columns (packed)."""
        if not self.packed:
            return min(self.shape[1] + 1, self.row_width)  # position t-1 predicts token t
        return torch.unique(self.predictors % self.row_width)  # sorted

    def select(self, logits: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
        """The rows of ``logits`` (a pass with ``logits_to_keep=keep``) that predict each response token ``(K, V)``.

        Raises:
            ValueError: the model returned logits at other positions than ``keep`` asked for.
        """
        expected = keep if isinstance(keep, int) else len(keep)
        if logits.shape[1] != expected:
            raise ValueError(f"ResponseForward: the model returned logits at {logits.shape[1]} positions for "
                             f"logits_to_keep={expected}; its forward must honour transformers' logits_to_keep")
        rows, columns = self.predictors.div(self.row_width, rounding_mode="floor"), self.predictors % self.row_width
        if isinstance(keep, int):
            return logits[rows, columns - (self.row_width - keep)]
        return logits[rows, torch.searchsorted(keep, columns)]

    def token_logits(self, model, temperature: float = 1.0) -> torch.Tensor:
        """The model's logits that predict each response token, divided by ``temperature``, ``(K, V)`` fp32."""
        keep = self.keep()
        logits = self.select(model(**self.inputs, logits_to_keep=keep, use_cache=False).logits, keep).float()
        return logits / temperature if temperature != 1.0 else logits

    def token_logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        """log π(token) of each response token under ``softmax(logits / temperature)`` ``(K,)`` fp32."""
        return token_logprobs(self.token_logits(model, temperature), self.tokens)

    def token_values(self, value_model) -> torch.Tensor:
        """V(s_t) for each response token, read where the token is predicted ``(K,)`` fp32."""
        return self.forward_values(value_model).reshape(-1)[self.predictors]

    def last_values(self, value_model) -> torch.Tensor:
        """The value head at each row's last token (its EOS, or the last one at the cap): a reward ``(B,)`` fp32."""
        return self.forward_values(value_model).reshape(-1)[self.last]

    def last_values_and_token_logprobs(self, value_model) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of a ``ValueHeadModel``: its value at each row's last token ``(B,)`` and the log-probs of the
        response tokens under its LM head ``(K,)`` (a reward model trained with an LM term), fp32."""
        keep = self.keep()
        values, logits = value_model(self.inputs["input_ids"], self.inputs["attention_mask"], return_lm_logits=True,
                                     position_ids=self.inputs["position_ids"], logits_to_keep=keep)
        return values.float().reshape(-1)[self.last], token_logprobs(self.select(logits, keep), self.tokens)

    def forward_values(self, value_model) -> torch.Tensor:
        """A value-head model's output at every position of the pass: ``(B, P + R)`` padded, ``(bins, width)`` packed."""
        values, _ = value_model(self.inputs["input_ids"], self.inputs["attention_mask"],
                                position_ids=self.inputs["position_ids"])
        return values.float()

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat ``(K,)`` tensor back at the response positions ``(B, R)``, zeros elsewhere."""
        out = flat.new_zeros(self.shape)
        out[self.rows, self.cols] = flat
        return out


def token_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in consecutive groups of at most ``max_tokens`` tokens (a longer row goes alone)."""
    groups, current, used = [], [], 0
    for row, length in enumerate(lengths):
        if current and used + length > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(row)
        used += length
    if current:
        groups.append(current)
    return groups


def response_logprob_sums(model, batch: TokenBatch, packed: bool = True, temperature: float = 1.0,
                          chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's response tokens and their count, ``(B,)`` each (fp32), in passes of
    at most ``chunk_tokens`` real tokens, so that a pass's logits stay bounded (packed, at most one row of
    positions per bin; at a 49k vocabulary 4,096 positions of fp32 logits take 0.8 GB) whatever the batch.

    Raises:
        ValueError: a row starts with a response token (see ``ResponseForward``).
    """
    sums = torch.zeros(len(batch.input_ids), device=batch.input_ids.device)
    for group in token_groups(batch.attention_mask.sum(dim=1).tolist(), chunk_tokens):
        rows = torch.tensor(group, device=batch.input_ids.device)
        part = TokenBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows])
        forward = ResponseForward.of_tokens(part, packed)
        sums[rows] = forward.scatter(forward.token_logprobs(model, temperature)).sum(dim=1)
    return sums, batch.response_mask.sum(dim=1).float()


@torch.no_grad()
def encoded_logprob_sums(model, rows: EncodedRows, pad_token_id: int, batch_size: int,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_logprob_sums`` over encoded rows, ``batch_size`` at a time, in eval mode on the model's device:
    each row's summed response log-probability (EOS included) under ``softmax(logits / temperature)`` and its
    response-token count, ``(N,)`` each (fp32); NaN for a row that did not fit the context."""
    device = next(model.parameters()).device
    model.eval()

    def logprob_and_count(batch: TokenBatch) -> torch.Tensor:
        return torch.stack(response_logprob_sums(model, batch.to(device), temperature=temperature), dim=1)

    out = score_encoded(rows, pad_token_id, batch_size, logprob_and_count)
    return out[:, 0], out[:, 1]
