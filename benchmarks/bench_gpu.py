"""PPO-max at real model sizes: seconds per phase, tokens/s, model FLOP utilisation and peak memory.

Runs the core library (torch, transformers, deepspeed, peft; no Kedro) on Llama shapes built from a config
with random weights, so nothing is downloaded. The policy, reference, critic and reward model all have the
shape; random weights almost never emit EOS, so every response is ``--new-tokens`` long (a fixed shape to
time). Usage:

    python benchmarks/bench_gpu.py --shape 135m                       # full fine-tuning, ZeRO-2
    python benchmarks/bench_gpu.py --shape 7b --lora-r 16 --gradient-checkpointing
    python benchmarks/bench_gpu.py --shape 1b --compare-static-cache  # generation with/without static cache
    python benchmarks/bench_gpu.py --estimate                         # what fits where (DeepSpeed's estimators)

``--shape tiny`` runs on a CPU in seconds (the test suite runs it). ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf_pipeline.adapters import LoraSettings
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, sample_responses
from rlhf_pipeline.modeling import ValueHeadModel, count_parameters, train_tokenizer
from rlhf_pipeline.provenance import write_result
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.devices import has_cuda, rank_device, synchronize
from rlhf_pipeline.training.engine import OptimConfig

# Public Llama-family shapes: SmolLM2-135M, Llama-3.2-1B, Llama-2-7B, Llama-3-8B (and a CPU-sized one)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=True),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# Dense bf16 peak of the GPU, for model FLOP utilisation
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
GIB = 2**30

logger = logging.getLogger("bench_gpu")


def llama_config(shape: str, max_positions: int = 4096) -> LlamaConfig:
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1)


def build(shape: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random-weight Llama of ``shape`` made directly on this rank's device, in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(rank_device()):
        return AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)


def prompts(count: int, words: int) -> list[str]:
    """HH-style prompts of ``words`` words (a few tokens each)."""
    return [f"\n\nHuman: {' '.join(f'w{(i * 7 + j) % 97}' for j in range(words))}?\n\nAssistant:" for i in range(count)]


def peak_tflops(override: float | None) -> float | None:
    if override or not has_cuda():
        return override
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on a CPU."""
    if has_cuda():
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def iteration_flops(params: int, sequences: int, seq_len: int, new_tokens: int, epochs: int, lora: bool) -> dict:
    """Model FLOPs of one PPO iteration (2·N per token forward; backward 4·N, or 2·N with frozen base weights
    under LoRA; attention's share and checkpointing's recompute left out, as MFU conventionally does)."""
    tokens = sequences * seq_len
    backward = 2 if lora else 4
    return {"generate": 2 * params * sequences * seq_len,  # prefill + one decoding step per new token
            "score": 4 * 2 * params * tokens,  # policy, reference, critic, reward model
            "update": epochs * 2 * (2 + backward) * params * tokens,  # policy and critic
            "new_tokens": sequences * new_tokens}


def run(args) -> dict:
    bf16 = has_cuda() and torch.cuda.is_bf16_supported() and not args.fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = train_tokenizer(prompts(64, 40), vocab_size=512)  # ids fit any shape's embedding
    policy = build(args.shape, dtype, seed=0)
    reward_model = ValueHeadModel(build(args.shape, dtype, seed=1), seed=2)
    params = count_parameters(policy)
    optim = OptimConfig(lr=1e-6, warmup_ratio=0.0, zero_stage=args.zero_stage, bf16=str(bf16),
                        gradient_checkpointing=args.gradient_checkpointing,
                        extra_ds_config={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
                        if args.offload_optimizer else {})
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0,
                              cache_implementation="static" if args.static_cache else None)
    cfg = PPOConfig(iterations=args.warmup + args.iterations, rollout_batch_size=args.rollout,
                    mini_batch_size=args.mini_batch_size, micro_batch_size=args.micro_batch_size,
                    ppo_epochs=args.epochs, max_prompt_length=args.prompt_tokens, sampling=sampling, ptx_coef=0.0,
                    policy_optim=optim, critic_optim=optim, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                    frozen_models=args.frozen_models, checkpoint_every=0, sample_every=0)
    trainer = PPOTrainer(policy, reward_model, DialogueEncoder(tokenizer), prompts(args.rollout, args.prompt_words), cfg)
    history = []
    for _ in range(cfg.iterations):
        metrics, exp = trainer.step()
        history.append((metrics, tuple(exp.sequences.shape)))
        logger.info("iteration %d: %.2f s", trainer.iteration, metrics["timing/total"])
    timed = history[args.warmup:]
    sequences, seq_len = timed[-1][1]
    flops = iteration_flops(params, sequences, seq_len, args.new_tokens, args.epochs, cfg.lora.enabled)
    phases = {phase: statistics.mean(m.get(f"timing/{phase}", 0.0) for m, _ in timed)
              for phase in ("gather", "generate", "score", "advantages", "update")}
    total = statistics.mean(m["timing/total"] for m, _ in timed)
    peak = peak_tflops(args.peak_tflops)
    result = {
        "shape": args.shape, "parameters_per_model": params, "device": torch.cuda.get_device_name() if has_cuda()
        else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "settings": {"lora_r": args.lora_r, "zero_stage": args.zero_stage, "gradient_checkpointing":
                     args.gradient_checkpointing, "offload_optimizer": args.offload_optimizer,
                     "frozen_models": args.frozen_models, "static_cache": args.static_cache},
        "shape_of_buffer": {"rollouts": sequences, "tokens_per_sequence": seq_len, "new_tokens": args.new_tokens},
        "seconds_per_iteration": total, "phase_seconds": phases,
        "generate_tokens_per_s": flops["new_tokens"] / phases["generate"],
        "train_tokens_per_s": args.epochs * 2 * sequences * seq_len / phases["update"],
        "model_tflops_per_s": (flops["generate"] + flops["score"] + flops["update"]) / total / 1e12,
        "peak_memory_gib": peak_memory_gib(),
    }
    result["mfu"] = result["model_tflops_per_s"] / peak if peak else None
    if args.compare_static_cache:
        result["generation"] = compare_static_cache(trainer, sampling, args.repeats)
    return result


def compare_static_cache(trainer: PPOTrainer, sampling: SamplingConfig, repeats: int) -> dict[str, float]:
    """Generation tokens/s of the rollout prompts with the dynamic and the static KV cache (each after an
    untimed call, which is where the static path compiles)."""
    model, prompt_ids = trainer.rollout_policy(), trainer.prompt_ids[:trainer.cfg.rollout_batch_size]
    out = {}
    for name, cache in (("dynamic", None), ("static", "static")):
        settings = replace(sampling, cache_implementation=cache)
        sample_responses(model, trainer.tokenizer, prompt_ids, settings)
        seconds = []
        for _ in range(repeats):
            synchronize()
            started = time.perf_counter()
            _, _, response, _ = sample_responses(model, trainer.tokenizer, prompt_ids, settings)
            synchronize()
            seconds.append(time.perf_counter() - started)
        out[f"{name}_tokens_per_s"] = response.numel() / statistics.median(seconds)
    return out


def estimate(gpu_gib: float) -> list[dict]:
    """Per-GPU memory of the PPO model states (trained policy and critic, frozen reference and reward model),
    from DeepSpeed's ZeRO estimators for the trained models and 2 bytes per frozen bf16 parameter."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for shape in ("135m", "1b", "7b", "8b"):
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(llama_config(shape))
        total = count_parameters(model)  # a tied embedding counts once
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        for gpus in (1, 8):
            frozen_whole, frozen_parted = 2 * 2 * total, 2 * 2 * total / gpus
            zero2 = estimate_zero2_model_states_mem_needs(total, gpus, cpu_offload=False)
            offload = estimate_zero2_model_states_mem_needs(total, gpus, cpu_offload=True)
            zero3 = estimate_zero3_model_states_mem_needs(total, largest, gpus, cpu_offload=False)
            options = {  # (GPU bytes, host bytes per node) for the two trained models, plus the frozen ones
                "full, ZeRO-2": (2 * zero2[1] + frozen_whole, 2 * zero2[0]),
                "full, ZeRO-2 + optimizer offload": (2 * offload[1] + frozen_whole, 2 * offload[0]),
                "full, ZeRO-3, frozen_models: zero3": (2 * zero3[1] + frozen_parted, 2 * zero3[0]),
                # the reference and reward model are the policy and critic with adapters off: two base copies
                "LoRA, ZeRO-2": (frozen_whole, 0),
            }
            for option, (device_bytes, host_bytes) in options.items():
                rows.append({"shape": shape, "parameters": total, "gpus": gpus, "option": option,
                             "model_states_gib": device_bytes / GIB, "host_gib": host_bytes / GIB,
                             "fits": device_bytes / GIB <= 0.8 * gpu_gib})
    return rows


def main(argv: list[str] | None = None) -> dict | list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rollout", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--prompt-words", type=int, default=40, help="~3 tokens per word with the bench tokenizer")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="max_prompt_length")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--frozen-models", default="device", choices=["device", "zero3", "zero3_offload"])
    parser.add_argument("--static-cache", action="store_true", help="roll out with the static KV cache")
    parser.add_argument("--compare-static-cache", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per cache in the comparison")
    parser.add_argument("--fp32", action="store_true", help="fp32 even where bf16 is supported")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on a GPU not in the table")
    parser.add_argument("--estimate", action="store_true", help="print the memory table and exit")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for --estimate")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.json:  # fail before minutes of benchmarking, not after
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("rlhf_pipeline", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.estimate:
        result = estimate(args.gpu_gib)
        print(f"PPO model states per GPU (policy + critic trained, reference + RM frozen, bf16; "
              f"'fits' = at most 80 % of {args.gpu_gib:.0f} GiB, the rest for activations)")
        print(f"{'shape':>6} {'params':>8} {'GPUs':>4}  {'option':<36} {'GiB/GPU':>8} {'host GiB':>9}  fits")
        for row in result:
            print(f"{row['shape']:>6} {row['parameters'] / 1e9:7.2f}B {row['gpus']:>4}  {row['option']:<36} "
                  f"{row['model_states_gib']:8.1f} {row['host_gib']:9.0f}  {'yes' if row['fits'] else 'no'}")
    else:
        result = run(args)
        print(f"PPO-max, {result['shape']} ({result['parameters_per_model'] / 1e6:.0f}M parameters x 4 models) on "
              f"{result['device']}, {result['dtype']}; settings {result['settings']}")
        print(f"  buffer: {result['shape_of_buffer']}")
        print(f"  {result['seconds_per_iteration']:.2f} s/iteration: " + ", ".join(
            f"{phase} {seconds:.2f}" for phase, seconds in result["phase_seconds"].items()))
        print(f"  generation {result['generate_tokens_per_s']:.0f} tokens/s, training "
              f"{result['train_tokens_per_s']:.0f} tokens/s, {result['model_tflops_per_s']:.2f} model TFLOP/s"
              + (f", MFU {100 * result['mfu']:.1f} %" if result["mfu"] else ", MFU n/a (no GPU peak known)"))
        print(f"  peak memory {result['peak_memory_gib']:.2f} GiB ({'GPU' if has_cuda() else 'CPU resident'})")
        if "generation" in result:
            g = result["generation"]
            print(f"  generate: dynamic cache {g['dynamic_tokens_per_s']:.0f} tokens/s, static cache "
                  f"{g['static_tokens_per_s']:.0f} tokens/s ({g['static_tokens_per_s'] / g['dynamic_tokens_per_s']:.2f}x)")
    if args.json:
        write_result(args.json, "bench_gpu_estimate" if args.estimate else "bench_gpu",
                     {"estimate": result} if args.estimate else result,
                     None if argv is None else ["bench_gpu.py", *argv])  # None: this process's sys.argv
    return result


if __name__ == "__main__":
    main()
