"""Time PPO-max iterations for a fixed shape and print seconds per iteration with the per-phase split.

Shape (issue #4): a ~3M-parameter GPT-2 policy (the reward model and critic have the same shape),
32 prompts, 48 response tokens, 4 PPO epochs, ptx off. Usage:

    .venv/bin/python benchmarks/bench_ppo.py [--iterations 5] [--warmup 1] [--device cpu|cuda]

Comparing with TRL's PPOTrainer (trl==0.28.0, trl.experimental.ppo) on the same shape is not
implemented yet; see the README.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    corpus = PROMPTS * 4 + [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 2000, 10)]
    tokenizer = train_tokenizer(corpus, SHAPE.vocab_size)
    policy = build_tiny_model(tokenizer, SHAPE)
    reward_model = ValueHeadModel(build_tiny_model(tokenizer, SHAPE))
    # EOS is banned so that every response has exactly 48 tokens: a fixed shape to time
    policy.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    cfg = PPOConfig(iterations=args.warmup + args.iterations, rollout_batch_size=32, mini_batch_size=8, ppo_epochs=4,
                    sampling=SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=1.0), ptx_coef=0.0,
                    policy_optim=OptimConfig(lr=1e-5, zero_stage=0), critic_optim=OptimConfig(lr=1e-5, zero_stage=0),
                    checkpoint_every=0, sample_every=0)
    trainer = PPOTrainer(policy, reward_model, tokenizer, PROMPTS, cfg)
    history = []
    for _ in range(cfg.iterations):
        started = time.perf_counter()
        metrics, _ = trainer.step()
        trainer.iteration += 1
        history.append((time.perf_counter() - started, metrics))
    timed = history[args.warmup:]
    seconds = [s for s, _ in timed]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"rlhf-pipeline PPO-max on {device}: policy {count_parameters(policy) / 1e6:.2f}M params, 32 prompts x 48 "
          f"tokens, 4 epochs, mini-batch 8, ptx off, {len(timed)} timed iterations")
    print(f"  seconds/iteration: {statistics.mean(seconds):.3f} (min {min(seconds):.3f}, max {max(seconds):.3f})")
    print(f"  iterations/s:      {1 / statistics.mean(seconds):.3f}")
    for phase in ("generate", "score", "advantages", "update"):
        mean_phase = statistics.mean(m[f"timing/{phase}"] for _, m in timed)
        print(f"  {phase:<11} {mean_phase:7.3f} s  ({100 * mean_phase / statistics.mean(seconds):5.1f} %)")
    print(f"  response tokens/s: {statistics.mean(m['timing/tokens_per_s'] for _, m in timed):.0f}")


if __name__ == "__main__":
    main()
