"""The PPO loop on a toy reward: it optimises, resumes after an interruption, runs as vanilla PPO and under ZeRO-3."""

import pytest
import torch
from torch import nn

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.modeling import TinyModelConfig, build_tiny_model, train_tokenizer
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig

PROMPTS = [f"\n\nHuman: Say something {i}.\n\nAssistant:" for i in range(16)]


class EvenTokenReward(nn.Module):
    """Toy reward model: the score at a position is the number of even token ids up to it."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # a module DeepSpeed could wrap; never trained here

    def forward(self, input_ids, attention_mask, return_lm_logits=False, position_ids=None):
        even = (input_ids % 2 == 0).float()
        if attention_mask is not None:
            return (even * (attention_mask > 0)).cumsum(dim=1), None
        # packed rows (no mask): the count restarts where a row's positions restart at 0
        total = even.cumsum(dim=1)
        before_row = torch.where(position_ids == 0, total - even, torch.zeros_like(total)).cummax(dim=1).values
        return total - before_row, None


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PROMPTS * 5, vocab_size=300)


def make_trainer(tokenizer, iterations, checkpoint_dir=None, model_seed=0, ptx_data=None, **overrides):
    policy = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=model_seed))
    cfg = PPOConfig(**{
        "iterations": iterations, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4,
        "sampling": SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0), "kl_coef": 0.0,
        "critic_from_reward_model": False, "policy_optim": OptimConfig(lr=3e-3, warmup_ratio=0.0, zero_stage=2),
        "critic_optim": OptimConfig(lr=3e-3, warmup_ratio=0.0, zero_stage=2), "checkpoint_every": 2,
        "sample_every": 5, **overrides})
    return PPOTrainer(policy, EvenTokenReward(), DialogueEncoder(tokenizer), PROMPTS, cfg, checkpoint_dir=checkpoint_dir,
                      ptx_data=ptx_data)


def test_mean_reward_rises_on_a_toy_reward(tokenizer):
    result = make_trainer(tokenizer, iterations=30).train()
    scores = [h["reward/raw_score"] for h in result.history]
    assert len(scores) == 30
    early, late = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert late > early + 1.0, f"mean reward did not rise: {early:.2f} -> {late:.2f}"
    assert {"timing/generate", "timing/score", "timing/update", "kl/sequence", "policy/clipfrac",
            "value/explained_variance", "response/perplexity"} <= set(result.history[-1])
    assert result.samples and {"prompt", "response", "rm_score", "step"} <= set(result.samples[0])


def test_resume_after_interruption_ends_at_the_configured_step(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, iterations=4, checkpoint_dir=tmp_path)

    def interrupt(metrics, step):
        if step == 3:
            raise KeyboardInterrupt  # the run is killed after iteration 3; iteration 2 was checkpointed

    trainer.log = interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "latest").read_text() == "iteration_2"
    with pytest.raises(ValueError, match=r"changed: clip_eps\."):
        make_trainer(tokenizer, iterations=4, checkpoint_dir=tmp_path, clip_eps=0.3)
    with pytest.raises(ValueError, match=r"changed: input sft_policy\."):  # another SFT model: old token ids
        make_trainer(tokenizer, iterations=4, checkpoint_dir=tmp_path, model_seed=1)
    # a longer run, another micro-batching and checkpoint interval leave the updates as they were: it resumes
    resumed = make_trainer(tokenizer, iterations=6, checkpoint_dir=tmp_path, checkpoint_every=3, micro_batch_size=4)
    assert resumed.iteration == 2 and resumed.moments.count == 2 * 16
    saved = torch.load(next((tmp_path / "policy" / "iteration_2").glob("mp_rank_00_model_states.pt")),
                       weights_only=False)["module"]
    fresh = make_trainer(tokenizer, iterations=4).policy.module.state_dict()
    for name, tensor in resumed.policy.module.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])  # weights come from the checkpoint, not the SFT model
    assert any(not torch.equal(tensor, fresh[name]) for name, tensor in saved.items())
    result = resumed.train()
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]  # the checkpoint carries the history
    assert (tmp_path / "latest").read_text() == "iteration_6" and (tmp_path / "complete").exists()
    again = make_trainer(tokenizer, iterations=2, checkpoint_dir=tmp_path)
    assert again.iteration == 0  # a finished run is not resumed; the new run replaces it
    again.train()
    assert sorted(p.name for p in tmp_path.glob("iteration_*.json")) == ["iteration_2.json"]


def test_scoring_in_chunks_equals_one_forward_over_the_buffer(tokenizer):
    from rlhf_pipeline.rl.experience import make_experience

    trainer = make_trainer(tokenizer, iterations=1, critic_from_reward_model=False)

    def experience(forward_batch_size):
        torch.manual_seed(0)  # the same rollouts both times
        return make_experience(trainer.policy.module, trainer.reference, trainer.critic.module, trainer.reward_model,
                               tokenizer, trainer.prompt_ids[:5], trainer.cfg.sampling, {},
                               forward_batch_size=forward_batch_size)

    whole, chunked = experience(None), experience(2)  # chunks of 2, 2 and 1 rows
    assert torch.equal(whole.sequences, chunked.sequences)
    for name in ("old_logprobs", "ref_logprobs", "old_values", "raw_scores"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), msg=name)


@pytest.mark.parametrize("split", [{"micro_batch_size": 2}, {"micro_batch_tokens": 60}, {"micro_batch_size": 2,
                                                                                        "packing": False}])  # noqa: E501
def test_micro_batches_give_the_mini_batchs_update(tokenizer, split):
    """Token-weighted accumulation, packed or not: norms before clipping (scale-sensitive, unlike Adam's step)
    and weights agree with one unpacked pass over the mini-batch."""
    from rlhf_pipeline.rl.experience import compute_advantages, make_experience

    settings = {"ppo_epochs": 1, "ptx_coef": 0.0}
    whole = make_trainer(tokenizer, iterations=1, packing=False, **settings)
    micro = make_trainer(tokenizer, iterations=1, **split, **settings)
    torch.manual_seed(0)
    exp = make_experience(whole.policy.module, whole.reference, whole.critic.module, whole.reward_model, tokenizer,
                          whole.prompt_ids, whole.cfg.sampling, {}, packing=False)
    exp = compute_advantages(exp, whole.cfg, whole.moments)
    assert len(set(exp.response_mask.sum(dim=1).tolist())) > 1  # unequal lengths: plain averaging would differ
    parts = micro.micro_batches(exp.select(torch.arange(8)))
    assert sorted(torch.cat(parts).tolist()) == list(range(8)) and len(parts) > 1
    torch.manual_seed(1)
    whole_metrics = whole.update(exp)
    torch.manual_seed(1)  # the same mini-batch order
    micro_metrics = micro.update(exp)
    for key in ("policy/grad_norm", "value/grad_norm", "loss/policy", "loss/value"):
        assert micro_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(whole.policy.module.parameters(), micro.policy.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert whole.policy.global_steps == micro.policy.global_steps == 2  # one optimiser step per mini-batch


def test_only_the_latest_checkpoints_stay_on_disk(tokenizer, tmp_path):
    make_trainer(tokenizer, iterations=4, checkpoint_dir=tmp_path, ppo_epochs=1, keep_checkpoints=1).train()
    assert sorted(p.name for p in tmp_path.glob("iteration_*")) == ["iteration_4.json", "iteration_4_rng_rank0.safetensors"]
    for engine in ("policy", "critic"):
        assert sorted(p.name for p in (tmp_path / engine).glob("iteration_*")) == ["iteration_4"]


def test_vanilla_settings_and_collapse_alarm_stop(tokenizer):
    trainer = make_trainer(tokenizer, iterations=5, score_reparam="none", score_clip=None,
                           advantage_normalisation=False, value_clip=None, alarm_length_growth=0.5, stop_on_alarm=True)
    result = trainer.train()
    assert result.stopped_early and len(result.history) == 1  # length can never exceed half its first value


def test_an_alarm_on_one_rank_stops_every_rank(tokenizer, monkeypatch):
    """This rank's metrics raise no alarm; the other rank's do. Every rank must take the other's decision, or
    one would leave the loop while the rest wait for it in the next collective."""
    trainer = make_trainer(tokenizer, iterations=5, alarm_kl=1e9, stop_on_alarm=True)
    from rlhf_pipeline.rl import monitors

    monkeypatch.setattr(monitors, "world", lambda: (0, 2))  # as the launcher's ranks see it; the engines' stays one
    reduce = torch.distributed.all_reduce
    flags = []

    def with_an_alarm_on_the_other_rank(tensor, op=torch.distributed.ReduceOp.SUM, **kwargs):
        if op == torch.distributed.ReduceOp.MAX:  # any_rank's decision
            flags.append(float(tensor))
            return tensor.fill_(1.0)
        return reduce(tensor, op=op, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", with_an_alarm_on_the_other_rank)
    result = trainer.train()
    assert flags == [0.0] and result.stopped_early and len(result.history) == 1


def test_score_moments_merge_every_ranks_scores_on_the_scores_device(monkeypatch):
    """The normaliser's moments are those of every rank's scores together; what is all-reduced lives on the
    scores' device (an NCCL group refuses CPU tensors; ``tests/test_cuda.py`` runs it on one)."""
    from rlhf_pipeline.rl import experience as experience_module
    from rlhf_pipeline.rl import ppo_max as F
    from rlhf_pipeline.training import engine

    mine, other = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([-3.0, 0.5])
    reduced = []

    def add_the_other_ranks(stats, **kwargs):
        reduced.append((stats.device, stats.dtype))
        stats += torch.tensor([len(other), other.sum(), (other**2).sum()], dtype=torch.float64)

    monkeypatch.setattr(engine, "world", lambda: (0, 2))  # all_ranks_sum's view of the ranks
    monkeypatch.setattr(torch.distributed, "all_reduce", add_the_other_ranks)
    moments = F.RunningMoments()
    experience_module.merge_moments(moments, mine)
    both = torch.cat([mine, other]).double()
    assert reduced == [(mine.device, torch.float64)]
    assert moments.count == 5 and moments.mean == pytest.approx(float(both.mean()))
    assert moments.std == pytest.approx(float(both.std(correction=0)), rel=1e-6)


def zero3(lr: float) -> OptimConfig:
    # threshold 0: ZeRO-3 partitions even this tiny model's parameters (by default small ones stay whole)
    return OptimConfig(lr=lr, warmup_ratio=0.0, zero_stage=3,
                       extra_ds_config={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})


def test_zero3_returns_the_whole_trained_policy_as_zero2_does(tokenizer):
    with_zero2 = make_trainer(tokenizer, iterations=2).train().policy
    trainer = make_trainer(tokenizer, iterations=2, policy_optim=zero3(3e-3), critic_optim=zero3(3e-3))
    assert trainer.policy.module.transformer.wte.weight.numel() == 0  # partitioned: the bug this guards against
    with_zero3 = trainer.train().policy
    initial = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)).state_dict()
    assert not torch.equal(with_zero2.transformer.wte.weight, initial["transformer.wte.weight"])  # it trained
    for name, tensor in with_zero2.state_dict().items():
        torch.testing.assert_close(with_zero3.state_dict()[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_is_off_so_the_first_ratio_is_one(tokenizer):
    trainer = make_trainer(tokenizer, iterations=1)
    assert trainer.policy.module.config.resid_pdrop > 0  # the model was built with dropout
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    trainer.policy.train()
    trainer.critic.train()
    train_logits = trainer.policy(input_ids=ids).logits
    train_values, _ = trainer.critic(ids, torch.ones_like(ids))
    trainer.policy.eval()
    trainer.critic.eval()
    torch.testing.assert_close(train_logits, trainer.policy(input_ids=ids).logits)
    torch.testing.assert_close(train_values, trainer.critic(ids, torch.ones_like(ids))[0])


def test_ptx_batches_are_drawn_per_mini_batch_and_rank_and_resume_with_the_run(tokenizer, tmp_path, monkeypatch):
    from rlhf_pipeline.rl import trainer as trainer_module

    settings = {"ptx_coef": 0.1, "ptx_batch_size": 4, "rollout_batch_size": 8, "checkpoint_dir": tmp_path}
    demonstrations = (PROMPTS, [f"It is {i}." for i in range(16)])
    run = make_trainer(tokenizer, iterations=2, ptx_data=demonstrations, **settings)
    draws = [run.ptx_batch() for _ in range(3)]
    assert len({tuple(d) for d in draws}) == 3 and all(len(set(d)) == 4 for d in draws)  # afresh, no repeats
    run.step()
    run.save_checkpoint()
    expected = run.ptx_batch()
    resumed = make_trainer(tokenizer, iterations=2, ptx_data=demonstrations, **settings)
    assert resumed.iteration == 1 and resumed.ptx_batch() == expected  # the generator's state came back
    fresh = {**settings, "checkpoint_dir": None}
    first_rank = make_trainer(tokenizer, iterations=2, ptx_data=demonstrations, **fresh).ptx_batch()
    assert first_rank == draws[0]  # seeded: the same run draws the same batches
    monkeypatch.setattr(trainer_module, "world", lambda: (1, 2))  # the second rank of two
    second_rank = make_trainer(tokenizer, iterations=2, ptx_data=demonstrations, **fresh).ptx_batch()
    assert second_rank != first_rank


def test_the_policys_schedule_counts_only_the_steps_it_takes(tokenizer):
    """Critic warm-up of 1 iteration out of 3, 2 mini-batches per iteration: the policy steps 4 times, so its
    linear decay (no warm-up) runs lr x [1, 3/4, 1/2, 1/4] and ends there; counted over all 6 iterations' worth
    of mini-batches it would end at lr x 1/2."""
    trainer = make_trainer(tokenizer, iterations=3, critic_warmup_iterations=1, ppo_epochs=1)
    lrs = []
    for _ in range(3):
        trainer.step()
        lrs.append(trainer.policy.get_lr()[0])  # the lr of the policy's next step
    assert trainer.policy.global_steps == 4 and trainer.critic.global_steps == 6
    assert lrs == pytest.approx([3e-3, 3e-3 * 1 / 2, 3e-3 * 1 / 4])


def test_the_update_reads_the_distribution_the_rollouts_were_sampled_from(tokenizer):
    """At T = 0.5 the old log-probs are tempered; the update's must be too, so that the first mini-batch's ratio
    is exactly 1 (untempered, it would be π(a) / π_T(a), far from 1 at T = 0.5)."""
    trainer = make_trainer(tokenizer, iterations=1, ppo_epochs=1, mini_batch_size=16,
                           sampling=SamplingConfig(max_new_tokens=8, temperature=0.5, top_p=1.0))
    metrics, _ = trainer.step()
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["policy/clipfrac"] == 0.0


def test_a_fresh_run_clears_only_what_a_run_wrote(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "iteration_notes.txt").write_text("mine")
    (tmp_path / "policy" / "20261130T000000").mkdir(parents=True)  # e.g. a catalog's saved versions
    make_trainer(tokenizer, iterations=2, checkpoint_dir=tmp_path, ppo_epochs=1).train()
    make_trainer(tokenizer, iterations=2, checkpoint_dir=tmp_path, ppo_epochs=1).train()  # afresh over a finished run
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "iteration_notes.txt").exists()
    assert (tmp_path / "policy" / "20261130T000000").is_dir()
    assert sorted(p.name for p in tmp_path.glob("iteration_*.json")) == ["iteration_2.json"]


def test_every_rank_runs_as_many_micro_batches(tokenizer, monkeypatch):
    """By tokens this rank's 8 rows make 2 micro-batches while the other rank's make 4: ZeRO communicates in every
    backward, so this rank must run 4 too (splitting its largest), or the ranks would wait for each other."""
    from types import SimpleNamespace

    trainer = make_trainer(tokenizer, iterations=1, micro_batch_tokens=40)
    batch = SimpleNamespace(attention_mask=torch.ones(8, 10), sequences=torch.zeros(8, 10, dtype=torch.long))
    assert [len(p) for p in trainer.micro_batches(batch)] == [4, 4]  # one rank: 40 tokens each
    trainer.world_size = 2

    def the_other_rank_has_four(tensor, op=None, **kwargs):
        assert op == torch.distributed.ReduceOp.MAX
        return tensor.fill_(max(float(tensor), 4.0))

    monkeypatch.setattr(torch.distributed, "all_reduce", the_other_rank_has_four)
    parts = trainer.micro_batches(batch)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
