import gc
import math
from dataclasses import replace

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import SamplingConfig, mask_after_eos, response_mask_of, sample_responses
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    disable_dropout,
    load_policy,
    load_value_model,
    train_tokenizer,
    use_fused_gelu,
)
from rlhf_pipeline.training.batching import collate_encoded
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.forward import ResponseForward
from rlhf_pipeline.training.reward import (
    RewardConfig,
    pairwise_ranking_loss,
    ranking_accuracy,
    train_reward_model,
)
from rlhf_pipeline.training.sft import SFTConfig, train_sft
from tests.reference import reference_nll

CORPUS = ["\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.", "\n\nHuman: Say hi.\n\nAssistant: hi"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def test_ranking_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5) + math.log(1 / (1 + math.exp(2)))) / 3
    assert pairwise_ranking_loss(chosen, rejected).item() == pytest.approx(expected)
    assert pairwise_ranking_loss(chosen, rejected, margin=1.0).item() > expected
    assert ranking_accuracy(chosen, rejected) == pytest.approx(1 / 3)  # ties do not count as correct


def test_response_masks_stop_after_eos():
    ids = torch.tensor([[5, 6, 0, 7, 8], [5, 0, 1, 1, 1]])  # eos = 0, pad = 1
    cleaned = mask_after_eos(ids, stop_ids=[0], pad_token_id=1)
    assert cleaned.tolist() == [[5, 6, 0, 1, 1], [5, 0, 1, 1, 1]]
    assert response_mask_of(cleaned, [0], 1).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    # a second end-of-turn token (Llama-3's <|eot_id|> beside <|end_of_text|>) ends a response as well
    two_stops = torch.tensor([[5, 9, 7, 0, 8], [5, 6, 0, 9, 8]])  # 0 and 9 both stop
    assert mask_after_eos(two_stops, [0, 9], 1).tolist() == [[5, 9, 1, 1, 1], [5, 6, 0, 1, 1]]
    assert response_mask_of(two_stops, [0, 9], 1).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_sampling_never_emits_the_pad_token_and_keeps_the_models_suppressed_tokens(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))
    allowed = {tokenizer.pad_token_id, 5}  # left to itself the model would sample pad half the time
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    _, _, response, _ = sample_responses(model, tokenizer, [tokenizer("Say hi.")["input_ids"]] * 4,
                                      SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0))
    assert response.tolist() == [[5] * 12] * 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_length_grouped_batches_and_the_static_cache_sample_what_one_plain_call_samples(tokenizer, arch):
    """Greedy decoding makes the three paths comparable token for token; rows come back in the prompts' order."""
    model = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2))
    prompts = [tokenizer("Say hi" + " now" * n + ".")["input_ids"] for n in (6, 0, 3, 9, 1, 4, 2)]
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False)
    plain = sample_responses(model, tokenizer, prompts, greedy)
    assert plain[0].shape == (7, max(map(len, prompts)))
    for settings in ({"batch_size": 3}, {"cache_implementation": "static"},
                     {"batch_size": 2, "cache_implementation": "static"}):
        prompt, mask, response, _ = sample_responses(model, tokenizer, prompts, replace(greedy, **settings))
        assert torch.equal(prompt, plain[0]) and torch.equal(mask, plain[1]), settings
        assert torch.equal(response, plain[2][:, :response.shape[1]]), settings
        assert (plain[2][:, response.shape[1]:] == tokenizer.pad_token_id).all(), settings


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_any_causal_lm_loads_from_a_local_directory(tmp_path, tokenizer, arch):
    model = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2))
    ModelBundle(model, tokenizer).save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_policy(str(tmp_path))
    assert type(loaded.model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
    ids = torch.tensor([[3, 4, 5]])
    model.eval(), loaded.model.eval()
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    value_model = ValueHeadModel(loaded.model)
    ModelBundle(value_model, tokenizer).save_pretrained(str(tmp_path / "rm"))
    reloaded = load_value_model(str(tmp_path / "rm")).model.eval()
    torch.testing.assert_close(reloaded(ids, torch.ones_like(ids))[0], value_model(ids, torch.ones_like(ids))[0])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_sft_memorises_a_batch(tokenizer, zero_stage):
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))
    prompts, responses = ["\n\nHuman: What is 2 plus 3?\n\nAssistant:"] * 8, ["2 plus 3 is 5."] * 8
    optim = OptimConfig(lr=1e-2, zero_stage=zero_stage, micro_batch_size=8, warmup_ratio=0.0)
    losses = []
    model, metrics = train_sft(model, DialogueEncoder(tokenizer), prompts, responses, prompts[:2], responses[:2],
                               SFTConfig(epochs=25, max_length=64, eval_every=0, optim=optim),
                               log=lambda m, step: losses.append(m["train/loss"]))
    assert len(losses) == 25
    assert losses[-1] < 0.2 * losses[0]
    assert metrics["val/loss"] < 0.25 * losses[0]  # held-out copy of the batch: memorised too
    assert metrics["val/loss_before"] > 4 * metrics["val/loss"]
    # the returned model holds no engine: DeepSpeed's hooks would keep its optimizer state alive
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine) and o.module is model]
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_sft_and_reward_model_steps_equal_padded_ones(tokenizer, arch):
    """One optimiser step over demonstrations and pairs of mixed lengths: the logged losses and the updated
    weights agree, so packing changes the cost only."""
    prompts = [f"\n\nHuman: {'Please, ' * (3 * (i % 3))}what is {i} plus {i}?\n\nAssistant:" for i in range(8)]
    responses = [f"{i} plus {i} is {2 * i}." + " Indeed." * (12 if i == 7 else i % 2) for i in range(8)]
    shape = TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2)
    # eps = 1: Adam's first update g / (|g| + 1) follows the gradient, not its sign (which float noise flips
    # where a gradient is ~0, e.g. the value head's bias, which cancels in r_chosen - r_rejected)
    optim = OptimConfig(lr=1.0, micro_batch_size=8, warmup_ratio=0.0, zero_stage=0,
                        extra_ds_config={"optimizer": {"params": {"eps": 1.0}}})

    def model():  # no dropout: its random masks would differ between the two layouts
        return disable_dropout(build_tiny_model(tokenizer, shape))

    rows = DialogueEncoder(tokenizer).encode_many(prompts, [[r] for r in responses], 128).rows
    padded = collate_encoded(rows, tokenizer.pad_token_id)
    assert ResponseForward.of_tokens(padded, packed=True).computed_tokens < padded.input_ids.numel()  # less padding
    results = {}
    for packing in (False, True):
        logged = []
        sft_model, _ = train_sft(model(), DialogueEncoder(tokenizer), prompts, responses,
                                 [], [], SFTConfig(epochs=1, max_length=128, eval_every=0, packing=packing, optim=optim),
                                 log=lambda m, step, logged=logged: logged.append(m))
        rm_logged = []
        rm, _ = train_reward_model(ValueHeadModel(model()), DialogueEncoder(tokenizer),
                                   prompts, responses, responses[::-1],
                                   RewardConfig(max_length=128, lm_loss_coef=1.0, packing=packing, optim=optim),
                                   log=lambda m, step, logged=rm_logged: logged.append(m))
        results[packing] = (logged[0], sft_model.state_dict(), rm_logged[0], rm.state_dict())
    (sft_a, weights_a, rm_a, rm_weights_a), (sft_b, weights_b, rm_b, rm_weights_b) = results[False], results[True]
    assert sft_b["train/loss"] == pytest.approx(sft_a["train/loss"], rel=1e-5)
    for key in ("train/ranking_loss", "train/lm_loss", "train/accuracy", "train/margin"):
        assert rm_b[key] == pytest.approx(rm_a[key], rel=1e-5, abs=1e-7), key
    for a, b in ((weights_a, weights_b), (rm_weights_a, rm_weights_b)):
        for name, tensor in a.items():
            torch.testing.assert_close(b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_reward_model_learns_a_preference(tokenizer):
    model = ValueHeadModel(build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)))
    prompts = ["\n\nHuman: Say hi.\n\nAssistant:"] * 16
    accuracies = []
    train_reward_model(model, DialogueEncoder(tokenizer), prompts, ["hi"] * 16, ["2 plus 3"] * 16,
                       RewardConfig(epochs=10, lm_loss_coef=0.5, optim=OptimConfig(lr=1e-2, micro_batch_size=8, zero_stage=2)),
                       log=lambda m, step: accuracies.append((m["train/accuracy"], m["train/lm_loss"])))
    assert accuracies[-1][0] == 1.0 and accuracies[-1][1] < accuracies[0][1]


def test_fused_gelu_replaces_the_python_gelu_with_the_same_function(tokenizer):
    from transformers.activations import GELUTanh, NewGELUActivation

    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2))
    assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == 2  # one per block
    use_fused_gelu(model)
    fused = [m for m in model.modules() if isinstance(m, GELUTanh)]
    assert len(fused) == 2 and not any(isinstance(m, NewGELUActivation) for m in model.modules())
    x = torch.linspace(-6, 6, 1001)
    # the exact (erf) GELU differs from the tanh form by up to 5e-4 here, so this tells them apart
    torch.testing.assert_close(fused[0](x), NewGELUActivation()(x), atol=1e-6, rtol=1e-6)


def test_value_head_starts_from_its_seed_whatever_ran_before(tokenizer):
    lm = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))

    def head(seed, draws_before):
        torch.rand(draws_before)  # other work in the same process moves the global RNG
        return ValueHeadModel(lm, seed=seed).value_head.weight

    torch.testing.assert_close(head(0, draws_before=1), head(0, draws_before=1000))
    assert not torch.equal(head(0, draws_before=1), head(1, draws_before=1))


def test_extra_deepspeed_config_merges_into_nested_sections():
    from rlhf_pipeline.training.engine import deepspeed_config

    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "gradient_clipping": 0.5}
    config = deepspeed_config(OptimConfig(zero_stage=2, extra_ds_config=offload))
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.5 and config["optimizer"]["type"] == "AdamW"


def test_value_head_reads_a_bf16_backbone(tokenizer):
    lm = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)).to(torch.bfloat16)
    model = ValueHeadModel(lm)
    assert model.value_head.weight.dtype == torch.float32
    ids = torch.tensor([[3, 4, 5]])
    values, _ = model(ids, torch.ones_like(ids))  # a dtype mismatch raised here before
    assert values.shape == (1, 3) and values.dtype == torch.float32


def test_sampling_stops_at_every_eos_the_generation_config_names(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))
    end_of_turn = 7  # e.g. Llama-3's <|eot_id|> beside the tokenizer's EOS
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in (5, end_of_turn)]
    torch.manual_seed(0)
    _, _, response, _ = sample_responses(model, tokenizer, [tokenizer("Say hi.")["input_ids"]] * 8,
                                      SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0))
    mask = response_mask_of(response, [tokenizer.eos_token_id, end_of_turn], tokenizer.pad_token_id)
    stopped = (response == end_of_turn).any(dim=1)
    assert stopped.any()  # with two tokens allowed, some rows sample the end-of-turn token
    for row, length in zip(response.tolist(), mask.sum(dim=1).tolist(), strict=True):
        if end_of_turn in row:
            assert row.index(end_of_turn) == length - 1 and set(row[length:]) <= {tokenizer.pad_token_id}


def test_critic_freezes_an_untied_lm_head_and_keeps_a_tied_one(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tied = ValueHeadModel(build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)))
    assert tied.freeze_unused_lm_head().lm.get_output_embeddings().weight.requires_grad  # GPT-2 ties it to wte
    untied = ValueHeadModel(AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=False)))
    untied.freeze_unused_lm_head()
    assert not untied.lm.get_output_embeddings().weight.requires_grad
    assert untied.lm.get_input_embeddings().weight.requires_grad and untied.value_head.weight.requires_grad


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("packed", [False, True])
def test_response_logprob_sums_equal_the_full_logits(tokenizer, arch, packed):
    from rlhf_pipeline.training.forward import response_logprob_sums

    model = build_tiny_model(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2)).eval()
    encoder = DialogueEncoder(tokenizer)
    rows = [encoder.encode("\n\nHuman: What is 2 plus 3?\n\nAssistant:", [r], 64) for r in ("2 plus 3 is 5.", "hi")]
    batch = collate_encoded(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = response_logprob_sums(model, batch, packed=packed)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for row in range(2):
        total, count = reference_nll(logits[row:row + 1], batch.input_ids[row:row + 1], batch.response_mask[row:row + 1])
        assert counts[row] == count and sums[row].item() == pytest.approx(-total.item(), rel=1e-5)
