"""Time PPO-max iterations against TRL's PPOTrainer on two shapes; print seconds per iteration, the per-phase
split, the share of computed tokens that are real, and GFLOP/s against this machine's measured matmul peak.

Both shapes: a ~3M-parameter GPT-2 policy (the reward model and critic have the same shape), 32 prompts,
at most 48 response tokens, 4 PPO epochs, mini-batch 8, ptx off.

* ``fixed`` (issue #4): 32 near-identical arithmetic prompts, EOS banned, so every response is 48 tokens.
* ``realistic``: 32 prompts of the embedded task with their real length spread, and a policy SFT-trained
  on the task inside the benchmark (seeded), so it stops at EOS with the task's response lengths.

Usage::

    .venv/bin/python benchmarks/bench_ppo.py [--shape fixed|realistic|both] [--iterations 5] [--warmup 1]
                                             [--compare-trl] [--repeats 3]

``--compare-trl`` times TRL's PPOTrainer (``trl==0.28.0``, ``trl.experimental.ppo``; install with
``pip install -e ".[bench]"``) on the same shape, from the same policy, in the same process, alternating.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig
from rlhf_pipeline.hh import hh_prompt_response
from rlhf_pipeline.modeling import (
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    count_parameters,
    train_tokenizer,
)
from rlhf_pipeline.provenance import write_result
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig

SHAPE = TinyModelConfig(arch="gpt2", vocab_size=2048, hidden_size=224, num_layers=4, num_heads=4, max_positions=256)
ROLLOUT, MINI_BATCH, EPOCHS, RESPONSE_TOKENS, MAX_PROMPT, LR = 32, 8, 4, 48, 96, 1e-5
MICRO_BATCH_TOKENS, FORWARD_BATCH = 512, 8  # packed micro-batches (a whole mini-batch here) and scoring chunks


@dataclass
class Shape:
    name: str
    tokenizer: object
    policy: torch.nn.Module
    prompts: list[str]
    ban_eos: bool


def fixed_shape() -> Shape:
    prompts = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(8) for b in range(4)]
    corpus = prompts * 4 + [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 2000, 10)]
    tokenizer = train_tokenizer(corpus, SHAPE.vocab_size)
    return Shape("fixed", tokenizer, build_tiny_model(tokenizer, SHAPE), prompts, ban_eos=True)


def realistic_shape() -> Shape:
    """The embedded task's prompts and a policy SFT-trained on its demonstrations, so responses end at EOS."""
    from rlhf_pipeline.task.generator import TaskConfig, generate_preference_rows
    from rlhf_pipeline.training.sft import SFTConfig, train_sft

    rows = [hh_prompt_response(row["chosen"]) for row in generate_preference_rows(TaskConfig(num_pairs=2400))]
    tokenizer = train_tokenizer([p + " " + r for p, r in rows], SHAPE.vocab_size)
    policy = build_tiny_model(tokenizer, SHAPE)
    demos, held_out = rows[:2000], rows[2000:]
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.05, micro_batch_size=32, zero_stage=0)
    policy, _ = train_sft(policy, DialogueEncoder(tokenizer), [p for p, _ in demos], [r for _, r in demos],
                          [p for p, _ in held_out[:32]], [r for _, r in held_out[:32]],
                          SFTConfig(epochs=2, max_length=128, eval_every=0, optim=optim))
    prompts = list(dict.fromkeys(p for p, _ in held_out))[:ROLLOUT]
    return Shape("realistic", tokenizer, policy, prompts, ban_eos=False)


def prepared_policy(shape: Shape) -> torch.nn.Module:
    policy = copy.deepcopy(shape.policy)
    # the fixed shape bans EOS so that every response has exactly 48 tokens
    policy.generation_config.suppress_tokens = [shape.tokenizer.eos_token_id] if shape.ban_eos else None
    return policy


def time_rlhf_pipeline(shape: Shape, iterations: int, packing: bool = True, bf16: bool = False,
                       ) -> tuple[list[float], list[dict]]:
    """Seconds, metrics and token counts of each PPO-max iteration of this project's trainer, in the precision
    TRL is given (never bf16 on one side and fp32 on the other)."""
    torch.manual_seed(0)
    reward_model = ValueHeadModel(build_tiny_model(shape.tokenizer, SHAPE))
    cfg = PPOConfig(iterations=iterations, rollout_batch_size=ROLLOUT, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS,
                    max_prompt_length=MAX_PROMPT, forward_batch_size=FORWARD_BATCH, packing=packing,
                    micro_batch_tokens=MICRO_BATCH_TOKENS if packing else None,
                    sampling=SamplingConfig(max_new_tokens=RESPONSE_TOKENS, temperature=1.0, top_p=1.0),
                    ptx_coef=0.0, policy_optim=OptimConfig(lr=LR, zero_stage=0, bf16=str(bf16)),
                    critic_optim=OptimConfig(lr=LR, zero_stage=0, bf16=str(bf16)), checkpoint_every=0, sample_every=0)
    trainer = PPOTrainer(prepared_policy(shape), reward_model, DialogueEncoder(shape.tokenizer), shape.prompts, cfg)
    seconds, metrics = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        step_metrics, exp = trainer.step()
        seconds.append(time.perf_counter() - started)
        step_metrics["real_tokens"] = float(exp.attention_mask.sum())
        step_metrics["padded_tokens"] = float(exp.sequences.numel())  # what a full-width pass computes
        metrics.append(step_metrics)
    return seconds, metrics


def time_trl(shape: Shape, iterations: int, bf16: bool = False) -> list[float]:
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

    tokenizer = copy.deepcopy(shape.tokenizer)
    tokenizer.padding_side = "left"
    policy = prepared_policy(shape)
    torch.manual_seed(0)
    score_config = copy.deepcopy(policy.config)
    score_config.num_labels = 1
    reward_model = AutoModelForSequenceClassification.from_config(score_config)
    value_model = AutoModelForSequenceClassification.from_config(score_config)
    encoder = DialogueEncoder(shape.tokenizer)
    prompts = Dataset.from_dict({"input_ids": [encoder.sampling_prompt(p, MAX_PROMPT, RESPONSE_TOKENS)
                                               for p in shape.prompts]})
    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = TRLConfig(output_dir=output_dir, per_device_train_batch_size=ROLLOUT, gradient_accumulation_steps=1,
                         num_mini_batches=ROLLOUT // MINI_BATCH, num_ppo_epochs=EPOCHS, response_length=RESPONSE_TOKENS,
                         local_rollout_forward_batch_size=ROLLOUT, total_episodes=ROLLOUT * iterations,
                         learning_rate=LR, temperature=1.0, kl_coef=0.05, bf16=bf16, report_to="none",
                         save_strategy="no", num_sample_generations=0, logging_steps=10**6, seed=0,
                         disable_tqdm=True, stop_token=None if shape.ban_eos else "eos")
        trainer = TRLTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=copy.deepcopy(policy),
                             reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                             callbacks=[timer])
        timer.stamps = [time.perf_counter()]
        trainer.train()
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]


def matmul_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 matrix-product rate, measured now (the ceiling for the achieved figure)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


def useful_gflop(params: int, real_tokens: float) -> float:
    """Model FLOPs an iteration must do on its real tokens, by either trainer: four scoring forwards and
    the generation (2·N per token each) and, per epoch, forward + backward of policy and critic (6·N)."""
    return (5 * 2 * params * real_tokens + EPOCHS * 2 * 6 * params * real_tokens) / 1e9


def run_shape(shape: Shape, args, peak: float) -> dict:
    """Time ``args.repeats`` alternations of both trainers on ``shape``; print and return the figures (per repeat:
    seconds per iteration, useful GFLOP/s, TRL's seconds; the phases in seconds, the real-token share and the
    response length in tokens averaged)."""
    params = count_parameters(shape.policy)
    speed_ups, figures = [], {"seconds_per_iteration": [], "useful_gflops": [], "trl_seconds_per_iteration": [],
                              "phase_seconds": {}, "update_real_token_share": [], "response_length": []}
    for repeat in range(1, args.repeats + 1):
        seconds, metrics = time_rlhf_pipeline(shape, args.warmup + args.iterations, bf16=args.bf16)
        seconds, metrics = seconds[args.warmup:], metrics[args.warmup:]
        mean = statistics.mean(seconds)
        real = statistics.mean(m["real_tokens"] for m in metrics)
        work = useful_gflop(params, real)
        share = statistics.mean(m["update/real_token_share"] for m in metrics)
        length = statistics.mean(m["response/length"] for m in metrics)
        print(f"[{shape.name} {repeat}/{args.repeats}] rlhf-pipeline: {mean:.3f} s/iteration (min {min(seconds):.3f}, "
              f"max {max(seconds):.3f}), {1 / mean:.3f} iterations/s")
        figures["seconds_per_iteration"].append(mean)
        figures["useful_gflops"].append(work / mean)
        figures["update_real_token_share"].append(share)
        figures["response_length"].append(length)
        for phase in ("generate", "score", "advantages", "update"):
            mean_phase = statistics.mean(m[f"timing/{phase}"] for m in metrics)
            figures["phase_seconds"].setdefault(phase, []).append(mean_phase)
            print(f"  {phase:<11} {mean_phase:7.3f} s  ({100 * mean_phase / mean:5.1f} %)")
        print(f"  response length {length:.1f} tokens; real tokens "
              f"{100 * real / statistics.mean(m['padded_tokens'] for m in metrics):.0f} % of the padded buffer, "
              f"{100 * share:.0f} % of what the update computes; {work / mean:.1f} useful GFLOP/s "
              f"({100 * work / mean / peak:.1f} % of the matmul peak)")
        if args.compare_trl:
            trl_seconds = time_trl(shape, args.warmup + args.iterations, bf16=args.bf16)[args.warmup:]
            trl_mean = statistics.mean(trl_seconds)
            speed_ups.append(trl_mean / mean)
            figures["trl_seconds_per_iteration"].append(trl_mean)
            print(f"[{shape.name} {repeat}/{args.repeats}] TRL 0.28 PPOTrainer, same shape: {trl_mean:.3f} s/iteration "
                  f"(min {min(trl_seconds):.3f}, max {max(trl_seconds):.3f}), {1 / trl_mean:.3f} iterations/s; "
                  f"{work / trl_mean:.1f} useful GFLOP/s at our rollouts' real tokens "
                  f"(TRL computes every pass at full width)")
            print(f"  speed-up of rlhf-pipeline over TRL: {speed_ups[-1]:.2f}x")
    if speed_ups:
        print(f"[{shape.name}] speed-up over TRL, median of {len(speed_ups)}: {statistics.median(speed_ups):.2f}x "
              f"(runs: {', '.join(f'{x:.2f}' for x in speed_ups)}; target >= 1.5x)")
    return {**figures, "phase_seconds": {k: statistics.mean(v) for k, v in figures["phase_seconds"].items()},
            "update_real_token_share": statistics.mean(figures["update_real_token_share"]),
            "response_length": statistics.mean(figures["response_length"]), "speed_ups": speed_ups,
            "parameters": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["fixed", "realistic", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--compare-trl", action="store_true", help="also time trl==0.28.0's PPOTrainer")
    parser.add_argument("--bf16", action="store_true", help="both trainers in bf16 (a GPU); default: both in fp32")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the trainers this many times and report the median speed-up (a noisy "
                             "machine drifts between runs; only same-run ratios mean anything)")
    parser.add_argument("--json", help="write the figures and their provenance (date, commit, command, machine) "
                                       "here, e.g. data/08_reporting/benchmarks/bench_ppo.json for `make report`")
    args = parser.parse_args()
    if args.repeats < 1 or args.iterations < 1:
        parser.error("--repeats and --iterations must be at least 1")
    if args.json:  # fail before minutes of benchmarking, not after
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"  # the in-benchmark SFT's progress bar
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_gflops()
    print(f"PPO-max on {device} (fp32 matmul peak measured now: {peak:.1f} GFLOP/s): GPT-2 policy, critic and RM, "
          f"{ROLLOUT} prompts, <= {RESPONSE_TOKENS} new tokens, {EPOCHS} epochs, mini-batch {MINI_BATCH}, ptx off, "
          f"{args.iterations} timed iterations after {args.warmup} untimed, both trainers in {'bf16' if args.bf16 else 'fp32'}")
    shapes = {}
    for name in (["fixed", "realistic"] if args.shape == "both" else [args.shape]):
        shape = fixed_shape() if name == "fixed" else realistic_shape()
        print(f"shape {name}: {count_parameters(shape.policy) / 1e6:.2f}M parameters, prompts of "
              f"{min(len(shape.tokenizer(p)['input_ids']) for p in shape.prompts)}-"
              f"{max(len(shape.tokenizer(p)['input_ids']) for p in shape.prompts)} tokens")
        shapes[name] = run_shape(shape, args, peak)
    if args.json:
        write_result(args.json, "bench_ppo", {
            "device": device, "matmul_peak_gflops": peak, "shapes": shapes,
            "settings": {"iterations": args.iterations, "warmup": args.warmup, "repeats": args.repeats,
                         "compare_trl": args.compare_trl, "bf16": args.bf16}})


if __name__ == "__main__":
    main()
