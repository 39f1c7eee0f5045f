"""DeepSpeed checkpoints read with ``torch.load(weights_only=True)``.

DeepSpeed's own ``TorchCheckpointEngine`` loads with ``weights_only=False``: a full unpickle, which runs
whatever code a tampered checkpoint holds. Its files contain only tensors, containers and the few
DeepSpeed classes allow-listed below, so the restricted unpickler reads them; anything else fails with
torch's error naming the unexpected global, and nothing is executed.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

SAFE_DEEPSPEED_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """``TorchCheckpointEngine`` whose ``load`` uses the restricted (weights-only) unpickler."""

    def load(self, path: str, map_location=None):
        """The object saved in the file ``path``, read by ``torch.load(weights_only=True)`` (``map_location`` as
        for ``torch.load``), which allows the DeepSpeed classes of ``SAFE_DEEPSPEED_GLOBALS`` beside tensors and
        containers.

        Raises:
            pickle.UnpicklingError: The file holds any other global (torch's message names it).
        """
        with torch.serialization.safe_globals(SAFE_DEEPSPEED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_checkpoints(engine) -> None:
    """Make ``engine.load_checkpoint`` read its files with the weights-only unpickler."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported: "
                         "remove `checkpoint` settings from the DeepSpeed config")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
