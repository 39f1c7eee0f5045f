"""DeepSpeed checkpoints round-trip through the weights-only unpickler, and a tampered one runs no code."""

import pickle

import pytest
import torch

from rlhf_pipeline.training.engine import OptimConfig, make_engine


def trained_engine(zero_stage: int, seed: int):
    torch.manual_seed(seed)
    engine = make_engine(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)),
                         OptimConfig(lr=1e-2, zero_stage=zero_stage, micro_batch_size=2, warmup_ratio=0.0), 10)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 4)).pow(2).sum())
        engine.step()
    return engine


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_engine_state_round_trips_with_weights_only_loading(tmp_path, zero_stage):
    saved = trained_engine(zero_stage, seed=0)
    saved.save_checkpoint(str(tmp_path), tag="t")
    restored = trained_engine(zero_stage, seed=1)
    restored.load_checkpoint(str(tmp_path), tag="t")
    for (name, a), b in zip(saved.module.state_dict().items(), restored.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert restored.global_steps == saved.global_steps == 2
    x = torch.randn(2, 4)  # the optimiser state came back too: the next step moves both engines alike
    for engine in (saved, restored):
        engine.backward(engine(x).pow(2).sum())
        engine.step()
    for a, b in zip(saved.module.parameters(), restored.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would create the marker file
        return open, (str(self.marker), "w")


def test_a_tampered_checkpoint_is_refused_without_running_its_code(tmp_path):
    engine = trained_engine(zero_stage=2, seed=0)
    engine.save_checkpoint(str(tmp_path), tag="t")
    marker = tmp_path / "code_ran"
    optim_file = next((tmp_path / "t").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(marker)}, optim_file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine.load_checkpoint(str(tmp_path), tag="t")
    assert not marker.exists()
