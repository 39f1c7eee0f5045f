"""benchmarks/bench_gpu.py on a CPU-sized Llama: the figures it prints hang together, and the memory table
agrees with the bytes-per-parameter arithmetic of mixed-precision Adam."""

import importlib.util
import json

import pytest

from rlhf_pipeline.report import benchmark_table
from tests.conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("bench_gpu", PROJECT_ROOT / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)

TINY = ["--shape", "tiny", "--iterations", "2", "--rollout", "8", "--mini-batch-size", "4", "--new-tokens", "12",
        "--prompt-words", "8"]


def test_benchmark_reports_consistent_figures(tmp_path):
    result = bench_gpu.main([*TINY, "--compare-static-cache", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == {"kind": "bench_gpu", **json.loads(json.dumps(result)), "provenance": written["provenance"]}
    assert written["provenance"]["command"].startswith("bench_gpu.py --shape tiny")
    buffer, phases = result["shape_of_buffer"], result["phase_seconds"]
    assert buffer["rollouts"] == 8 and buffer["new_tokens"] == 12
    assert sum(phases.values()) == pytest.approx(result["seconds_per_iteration"], rel=1e-6)
    assert result["generate_tokens_per_s"] == pytest.approx(8 * 12 / phases["generate"])
    assert result["train_tokens_per_s"] == pytest.approx(2 * 8 * buffer["tokens_per_sequence"] / phases["update"])
    assert result["mfu"] is None and result["peak_memory_gib"] > 0  # no GPU peak to divide by on a CPU
    assert set(result["generation"]) == {"dynamic_tokens_per_s", "static_tokens_per_s"}
    row = benchmark_table(written).iloc[0]  # the file as `make report` renders it
    assert row["s/iteration"] == result["seconds_per_iteration"] and row["MFU"] is None
    assert row["generate / score / update s"] == " / ".join(f"{phases[p]:.2f}" for p in ("generate", "score", "update"))


def test_benchmark_runs_the_memory_options_together():
    result = bench_gpu.main([*TINY, "--lora-r", "4", "--gradient-checkpointing", "--frozen-models", "zero3",
                             "--micro-batch-size", "2", "--static-cache"])
    assert result["settings"] == {"lora_r": 4, "zero_stage": 2, "gradient_checkpointing": True,
                                  "offload_optimizer": False, "frozen_models": "zero3", "static_cache": True}
    assert result["seconds_per_iteration"] > 0


def test_memory_table_is_bytes_per_parameter_arithmetic():
    rows = {(r["shape"], r["gpus"], r["option"]): r for r in bench_gpu.estimate(80.0)}
    n = rows[("7b", 1, "LoRA, ZeRO-2")]["parameters"]
    assert n == pytest.approx(6.74e9, rel=0.01)  # Llama-2-7B
    gib = 2**30
    # LoRA: two bf16 base copies (policy = reference, critic = reward model): 4 bytes per parameter
    assert rows[("7b", 1, "LoRA, ZeRO-2")]["model_states_gib"] == pytest.approx(4 * n / gib)
    # full fine-tuning on one GPU: per trained model 2 (bf16 weights) + 18 (grads, fp32 master, Adam moments)
    # bytes, twice, plus two frozen bf16 models
    assert rows[("7b", 1, "full, ZeRO-2")]["model_states_gib"] == pytest.approx((2 * 20 + 4) * n / gib, rel=1e-6)
    assert rows[("7b", 1, "LoRA, ZeRO-2")]["fits"] and not rows[("7b", 1, "full, ZeRO-2")]["fits"]
    table = benchmark_table({"kind": "bench_gpu_estimate", "estimate": bench_gpu.estimate(80.0)})  # `make report`
    lora = table[(table["shape"] == "7b") & (table["GPUs"] == 1) & (table["option"] == "LoRA, ZeRO-2")].iloc[0]
    assert lora["GiB per GPU"] == pytest.approx(4 * n / gib) and lora["fits"] == "yes"
