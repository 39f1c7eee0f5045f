"""Padding of encoded prompt/response pairs, with the response mask that every loss uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf_pipeline.formatting import Encoded, EncodedRows


@dataclass(frozen=True)
class PackedLayout:
    """Rows of a padded batch packed into bins: each bin is a row as wide as the longest input row and holds
    several rows' real tokens one after another, with position ids restarting at each (transformers then
    confines attention to each packed row). Attention per bin costs what a padded row costs, so packing
    never costs more than padding; the padding it removes is saved.

    ``flat``: for each real token, in row-major order, its index into the bins flattened ``(bins * width,)``.
    """

    bins: int
    width: int
    flat: torch.Tensor  # (real tokens,)
    starts: torch.Tensor  # (B,) flat index of each row's first token
    lengths: torch.Tensor  # (B,)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> PackedLayout:
        """First-fit decreasing: rows by length, longest first, each into the first bin with room."""
        lengths = attention_mask.sum(dim=1)
        width = int(lengths.max())
        free: list[int] = []  # room left in each bin
        starts = [0] * len(lengths)
        for row in sorted(range(len(lengths)), key=lambda r: -int(lengths[r])):
            length = int(lengths[row])
            slot = next((b for b, room in enumerate(free) if room >= length), None)
            if slot is None:
                slot = len(free)
                free.append(width)
            starts[row] = slot * width + width - free[slot]
            free[slot] -= length
        starts = torch.tensor(starts, device=attention_mask.device)
        flat = torch.repeat_interleave(starts, lengths) + torch.arange(int(lengths.sum()), device=lengths.device) \
            - torch.repeat_interleave(lengths.cumsum(dim=0) - lengths, lengths)
        return cls(len(free), width, flat, starts, lengths)

    def pack(self, values: torch.Tensor, real: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``values`` at the real positions ``real`` of the padded batch, laid out in bins ``(bins, width)``."""
        out = values.new_full((self.bins * self.width,), fill)
        out[self.flat] = values[real]
        return out.view(self.bins, self.width)

    def positions(self) -> torch.Tensor:
        """Position ids: 0.. within each packed row; a bin's trailing padding continues its last row."""
        out = torch.arange(self.width, device=self.flat.device).repeat(self.bins)
        within = torch.arange(len(self.flat), device=self.flat.device) - torch.repeat_interleave(
            self.lengths.cumsum(dim=0) - self.lengths, self.lengths)
        out[self.flat] = within
        return out.view(self.bins, self.width)


@dataclass
class TokenBatch:
    """Right-padded prompt + response sequences (``collate``); ``training.forward`` packs them for a pass."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    response_mask: torch.Tensor  # (B, T) 1 for response tokens (EOS included), 0 for prompt and padding

    def to(self, device: torch.device | str) -> TokenBatch:
        """A new batch with the three tensors on ``device`` (a tensor already there is shared, not copied)."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate(sequences: list[tuple[list[int], int]], pad_token_id: int) -> TokenBatch:
    """Right-pad ``(token ids, prompt length)`` sequences into a ``TokenBatch``."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, prompt_length : len(ids)] = 1
    return TokenBatch(input_ids, attention_mask, response_mask)


def collate_encoded(rows: Sequence[Encoded], pad_token_id: int, response: int = 0) -> TokenBatch:
    """A batch of each row's prompt followed by its ``response``-th response."""
    return collate([(row.prompt_ids + row.response_ids[response], len(row.prompt_ids)) for row in rows], pad_token_id)


def score_encoded(rows: EncodedRows, pad_token_id: int, batch_size: int,
                  score: Callable[[TokenBatch], torch.Tensor], response: int = 0) -> torch.Tensor:
    """``score(batch) -> (B, ...)`` over the rows that fit, in batches; rows that did not fit get NaN ``(N, ...)``."""
    kept = rows.kept
    parts = [score(collate_encoded([rows.rows[i] for i in kept[start:start + batch_size]], pad_token_id, response))
             .float().cpu() for start in range(0, len(kept), batch_size)]
    if not parts:
        return torch.full((len(rows.rows),), math.nan)
    scores = torch.cat(parts)
    out = torch.full((len(rows.rows), *scores.shape[1:]), math.nan)
    out[kept] = scores
    return out
