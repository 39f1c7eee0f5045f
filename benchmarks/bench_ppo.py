"""Time PPO-max iterations for a fixed shape and print seconds per iteration with the per-phase split.

Shape (issue #4): a ~3M-parameter GPT-2 policy (the reward model and critic have the same shape),
32 prompts, 48 response tokens, 4 PPO epochs, mini-batch 8, ptx off. Usage:

    .venv/bin/python benchmarks/bench_ppo.py [--iterations 5] [--warmup 1] [--compare-trl] [--repeats 3]

``--compare-trl`` times TRL's PPOTrainer (``trl==0.28.0``, ``trl.experimental.ppo``; install with
``pip install -e ".[bench]"``) on the same shape in the same process and prints the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time

import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.modeling import (
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    count_parameters,
    train_tokenizer,
)
from rlhf_pipeline.rl.trainer import PPOConfig, PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig

SHAPE = TinyModelConfig(arch="gpt2", vocab_size=2048, hidden_size=224, num_layers=4, num_heads=4, max_positions=256)
PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(8) for b in range(4)]  # 32 prompts
ROLLOUT, MINI_BATCH, EPOCHS, RESPONSE_TOKENS, LR = 32, 8, 4, 48, 1e-5


def make_tokenizer():
    corpus = PROMPTS * 4 + [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 2000, 10)]
    return train_tokenizer(corpus, SHAPE.vocab_size)


def time_rlhf_pipeline(tokenizer, iterations: int) -> tuple[list[float], list[dict[str, float]]]:
    """Seconds and metrics of each PPO-max iteration of this project's trainer."""
    policy = build_tiny_model(tokenizer, SHAPE)
    reward_model = ValueHeadModel(build_tiny_model(tokenizer, SHAPE))
    # EOS is banned so that every response has exactly 48 tokens: a fixed shape to time
    policy.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    cfg = PPOConfig(iterations=iterations, rollout_batch_size=ROLLOUT, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS,
                    sampling=SamplingConfig(max_new_tokens=RESPONSE_TOKENS, temperature=1.0, top_p=1.0), ptx_coef=0.0,
                    policy_optim=OptimConfig(lr=LR, zero_stage=0), critic_optim=OptimConfig(lr=LR, zero_stage=0),
                    checkpoint_every=0, sample_every=0)
    trainer = PPOTrainer(policy, reward_model, DialogueEncoder(tokenizer), PROMPTS, cfg)
    seconds, metrics = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        step_metrics, _ = trainer.step()
        trainer.iteration += 1
        seconds.append(time.perf_counter() - started)
        metrics.append(step_metrics)
    return seconds, metrics


def time_trl(tokenizer, iterations: int) -> list[float]:
    """Seconds of each update of TRL's PPOTrainer on the same shape (rollout 32, 4 mini-batches of 8, 4 epochs)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer as TRLTrainer

    class UpdateTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    policy = build_tiny_model(tokenizer, SHAPE)
    policy.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    score_config = copy.deepcopy(policy.config)
    score_config.num_labels = 1
    reward_model = AutoModelForSequenceClassification.from_config(score_config)
    value_model = AutoModelForSequenceClassification.from_config(score_config)
    prompts = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in PROMPTS]})
    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TRLConfig(output_dir=output_dir, per_device_train_batch_size=ROLLOUT, gradient_accumulation_steps=1,
                         num_mini_batches=ROLLOUT // MINI_BATCH, num_ppo_epochs=EPOCHS, response_length=RESPONSE_TOKENS,
                         local_rollout_forward_batch_size=ROLLOUT, total_episodes=ROLLOUT * iterations,
                         learning_rate=LR, temperature=1.0, kl_coef=0.05, bf16=False, report_to="none",
                         save_strategy="no", num_sample_generations=0, logging_steps=10**6, seed=0,
                         disable_tqdm=True)
        trainer = TRLTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=copy.deepcopy(policy),
                             reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                             callbacks=[timer])
        timer.stamps = [time.perf_counter()]
        trainer.train()
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--compare-trl", action="store_true", help="also time trl==0.28.0's PPOTrainer")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the trainers this many times and report the median speed-up (a noisy "
                             "machine drifts between runs; only same-run ratios mean anything)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"PPO-max on {device}: policy {count_parameters(build_tiny_model(tokenizer, SHAPE)) / 1e6:.2f}M params, "
          f"{ROLLOUT} prompts x {RESPONSE_TOKENS} tokens, {EPOCHS} epochs, mini-batch {MINI_BATCH}, ptx off, "
          f"{args.iterations} timed iterations after {args.warmup} untimed")
    speed_ups = []
    for repeat in range(1, args.repeats + 1):
        seconds, metrics = time_rlhf_pipeline(tokenizer, args.warmup + args.iterations)
        seconds, metrics = seconds[args.warmup:], metrics[args.warmup:]
        mean = statistics.mean(seconds)
        print(f"[{repeat}/{args.repeats}] rlhf-pipeline: {mean:.3f} s/iteration (min {min(seconds):.3f}, "
              f"max {max(seconds):.3f}), {1 / mean:.3f} iterations/s")
        for phase in ("generate", "score", "advantages", "update"):
            mean_phase = statistics.mean(m[f"timing/{phase}"] for m in metrics)
            print(f"  {phase:<11} {mean_phase:7.3f} s  ({100 * mean_phase / mean:5.1f} %)")
        print(f"  response tokens/s: {statistics.mean(m['timing/tokens_per_s'] for m in metrics):.0f}")
        if args.compare_trl:
            trl_seconds = time_trl(tokenizer, args.warmup + args.iterations)[args.warmup:]
            trl_mean = statistics.mean(trl_seconds)
            speed_ups.append(trl_mean / mean)
            print(f"[{repeat}/{args.repeats}] TRL 0.28 PPOTrainer, same shape: {trl_mean:.3f} s/iteration "
                  f"(min {min(trl_seconds):.3f}, max {max(trl_seconds):.3f}), {1 / trl_mean:.3f} iterations/s")
            print(f"  speed-up of rlhf-pipeline over TRL: {speed_ups[-1]:.2f}x")
    if speed_ups:
        print(f"speed-up over TRL, median of {len(speed_ups)}: {statistics.median(speed_ups):.2f}x "
              f"(runs: {', '.join(f'{x:.2f}' for x in speed_ups)}; target >= 1.5x)")

if __name__ == "__main__":
    main()
