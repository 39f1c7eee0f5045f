"""Independent reference computations the tests compare the project's code with."""

import torch


def reference_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the response tokens under full-sequence ``logits`` ``(B, T, V)`` (position t-1 predicts token
    t, by cross-entropy over every position) and their count."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = response_mask[:, 1:].float()
    return (nll * mask).sum(), mask.sum()
