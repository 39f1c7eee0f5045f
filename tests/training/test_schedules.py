"""Learning-rate schedules and gradient accumulation: the lr of every optimiser step, and steps that do not
depend on how their rows are split into micro-batches."""

import math

import pytest
import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.modeling import (
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    disable_dropout,
    train_tokenizer,
)
from rlhf_pipeline.training.batching import collate_encoded
from rlhf_pipeline.training.engine import OptimConfig, make_engine
from rlhf_pipeline.training.loop import optimizer_steps
from rlhf_pipeline.training.reward import RewardConfig, train_reward_model
from rlhf_pipeline.training.sft import SFTConfig, train_sft
from tests.reference import reference_nll

CORPUS = ["\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.", "\n\nHuman: Say hi.\n\nAssistant: hi"] * 20
SHAPE = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)
PROMPTS = ["\n\nHuman: Say hi.\n\nAssistant:", "\n\nHuman: What is 2 plus 3?\n\nAssistant:"]
RESPONSES = ["hi", "2 plus 3 is 5. " * 8]  # 2 and 49 response tokens: a mean of row means is far off


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def engine_lrs(cfg: OptimConfig, total_steps: int, steps: int) -> list[float]:
    """The lr of each of ``steps`` optimiser steps of an engine planned for ``total_steps``."""
    torch.manual_seed(0)
    engine = make_engine(torch.nn.Linear(3, 1), cfg, total_steps)
    lrs = []
    for _ in range(steps):
        lrs.append(engine.get_lr()[0])
        engine.backward(engine(torch.randn(cfg.micro_batch_size, 3)).sum())
        engine.step()
    return lrs


@pytest.mark.parametrize(("warmup_ratio", "total_steps", "expected"), [
    (0.5, 4, [1 / 2, 1, 2 / 3, 1 / 3]),  # W = 2: up to the peak at step 2, then down towards 0 at step 5
    (0.0, 4, [1, 3 / 4, 2 / 4, 1 / 4]),  # no warm-up: the first step at the full lr
    (0.1, 4, [1, 3 / 4, 2 / 4, 1 / 4]),  # floor(0.4) = 0 warm-up steps
    (1.0, 3, [1 / 3, 2 / 3, 1]),  # warm-up only
    (0.25, 4, [1, 3 / 4, 2 / 4, 1 / 4]),  # W = 1: the first step is the peak
    (0.0, 1, [1]),
])
def test_every_step_runs_at_the_hand_computed_lr(warmup_ratio, total_steps, expected):
    cfg = OptimConfig(lr=1.0, warmup_ratio=warmup_ratio, micro_batch_size=1)
    assert engine_lrs(cfg, total_steps, total_steps) == pytest.approx(expected)


def test_steps_past_the_plan_keep_the_last_lr():
    cfg = OptimConfig(lr=2.0, warmup_ratio=0.5, micro_batch_size=1)
    assert engine_lrs(cfg, 2, 4) == pytest.approx([2.0, 1.0, 1.0, 1.0])  # W = 1: the peak, then (2 + 1 - 2) / 2


def test_warmup_ratio_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimConfig(warmup_ratio=1.5)


def sft_step(tokenizer, micro_batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    """One SFT epoch over ``PROMPTS``/``RESPONSES``: (logged metrics of its one step, the weights after it).

    eps = 1 makes Adam's first update g / (|g| + 1), which depends on the gradient's size and not only on
    its sign; a fresh model of ``SHAPE`` has gradients well below 1, so updates differ where gradients do."""
    optim = OptimConfig(lr=1.0, warmup_ratio=0.0, grad_clip=0.0, zero_stage=2, micro_batch_size=micro_batch_size,
                        grad_accum=grad_accum, extra_ds_config={"optimizer": {"params": {"eps": 1.0}}})
    logged = []
    sft = SFTConfig(epochs=1, max_length=128, eval_every=0, packing=False, optim=optim)
    model, _ = train_sft(disable_dropout(build_tiny_model(tokenizer, SHAPE)), DialogueEncoder(tokenizer), PROMPTS,
                         RESPONSES, [], [], sft, log=lambda metrics, step: logged.append(metrics))
    assert len(logged) == 1
    return logged[0], model.state_dict()


def reference_sft_gradient_norms(tokenizer) -> tuple[float, float, float]:
    """Plain torch on the same model: (token-weighted mean NLL over both rows, the norm of its gradient, the
    norm of the gradient of the mean of the two rows' mean NLLs)."""
    rows = DialogueEncoder(tokenizer).encode_many(PROMPTS, [[r] for r in RESPONSES], 128).rows
    model = disable_dropout(build_tiny_model(tokenizer, SHAPE))
    sums, counts = [], []
    for row in rows:
        batch = collate_encoded([row], tokenizer.pad_token_id)
        total, count = reference_nll(model(batch.input_ids).logits, batch.input_ids, batch.response_mask)
        sums.append(total)
        counts.append(count)
    assert counts == [2, 49]

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))

    token_mean = (sums[0] + sums[1]) / (counts[0] + counts[1])
    return token_mean.item(), norm(token_mean), norm((sums[0] / counts[0] + sums[1] / counts[1]) / 2)


def test_sft_step_is_the_token_mean_however_the_rows_are_split(tokenizer):
    loss, norm, row_mean_norm = reference_sft_gradient_norms(tokenizer)
    assert abs(row_mean_norm - norm) > 0.05 * norm  # the two weightings are told apart
    whole, whole_weights = sft_step(tokenizer, micro_batch_size=2, grad_accum=1)
    split, split_weights = sft_step(tokenizer, micro_batch_size=1, grad_accum=2)
    for logged in (whole, split):
        assert logged["train/loss"] == pytest.approx(loss, rel=1e-5)
        assert logged["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(split_weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    initial = build_tiny_model(tokenizer, SHAPE).state_dict()
    moved = max(float((tensor - initial[name]).abs().max()) for name, tensor in whole_weights.items())
    assert moved > 1e-3  # the step moved the weights by far more than the tolerance


def rm_step(tokenizer, micro_batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    optim = OptimConfig(lr=1.0, warmup_ratio=0.0, grad_clip=0.0, zero_stage=2, micro_batch_size=micro_batch_size,
                        grad_accum=grad_accum, extra_ds_config={"optimizer": {"params": {"eps": 1.0}}})
    logged = []
    # three pairs, so that a 2 + 1 split weighs pairs unequally if it averages per micro-batch
    prompts = PROMPTS + ["\n\nHuman: Hi.\n\nAssistant:"]
    chosen, rejected = RESPONSES + ["hi"], ["no", "2 plus 3 is 6.", "2 plus 3"]
    model, _ = train_reward_model(ValueHeadModel(disable_dropout(build_tiny_model(tokenizer, SHAPE))),
                                  DialogueEncoder(tokenizer), prompts, chosen, rejected,
                                  RewardConfig(max_length=128, lm_loss_coef=1.0, score_l2_coef=0.1, packing=False,
                                               optim=optim),
                                  log=lambda metrics, step: logged.append(metrics))
    assert len(logged) == 1
    return logged[0], model.state_dict()


def test_reward_model_step_does_not_depend_on_the_split(tokenizer):
    """Ranking and score terms weigh by pairs, the LM term by chosen tokens, over the whole window."""
    whole, whole_weights = rm_step(tokenizer, micro_batch_size=3, grad_accum=1)
    split, split_weights = rm_step(tokenizer, micro_batch_size=2, grad_accum=2)
    for key in ("train/loss", "train/ranking_loss", "train/lm_loss", "train/accuracy", "train/margin",
                "train/grad_norm"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(split_weights[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(("epochs", "steps"), [(1, 2), (2, 4)])
def test_a_short_last_window_takes_its_step(tokenizer, epochs, steps):
    """3 micro-batches, 2 per step: each epoch ends with a window of one, which steps too."""
    optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, micro_batch_size=1, grad_accum=2)
    assert optimizer_steps(3, epochs, optim) == steps
    logged = []
    train_sft(build_tiny_model(tokenizer, SHAPE), DialogueEncoder(tokenizer),
              PROMPTS + ["\n\nHuman: Hi.\n\nAssistant:"], RESPONSES + ["hi"], [], [],
              SFTConfig(epochs=epochs, max_length=128, eval_every=0, optim=optim),
              log=lambda metrics, step: logged.append((step, metrics["train/lr"], metrics["train/epoch"])))
    assert [step for step, _, _ in logged] == list(range(1, steps + 1))
    # the lr each step ran at: T steps from the full lr down by lr/T each
    assert [lr for _, lr, _ in logged] == pytest.approx([1e-2 * (steps - k) / steps for k in range(steps)])
    assert [epoch for _, _, epoch in logged] == [float(e) for e in range(epochs) for _ in range(2)]
