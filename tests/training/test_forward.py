"""One response forward: packed = padded = the model's own forward (soft-capped and logit-scaled architectures
included), log-probs at the sampling temperature, and truncated responses scored with EOS appended."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, GraniteConfig, LlamaConfig

from rlhf_pipeline.modeling import ValueHeadModel
from rlhf_pipeline.rl import ppo_max as F
from rlhf_pipeline.rl.experience import as_scored, score_rollouts
from rlhf_pipeline.training.batching import collate
from rlhf_pipeline.training.forward import ResponseForward, positions, response_logprob_sums

VOCAB, PAD, EOS = 40, 0, 1
SMALL = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
         "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": 2}
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                               pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2),
    "llama": lambda: LlamaConfig(**SMALL),
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.3, attn_logit_softcapping=None),
    "granite": lambda: GraniteConfig(**SMALL, logits_scaling=4.0),
}
# prompts left-padded to width 4, responses right-padded to width 4 (EOS, none at the cap, one token, two); the
# two short rows share a bin when packed
PROMPTS = [[PAD, 5, 6, 7], [8, 9, 10, 11], [PAD, PAD, 12, 13], [PAD, PAD, PAD, 20]]
RESPONSES = [[14, 15, EOS, PAD], [16, 17, 18, 19], [EOS, PAD, PAD, PAD], [21, EOS, PAD, PAD]]
MASKS = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def buffer():
    prompt, response, response_mask = (torch.tensor(x) for x in (PROMPTS, RESPONSES, MASKS))
    return prompt, (prompt != PAD).long(), response, response_mask


def model_for(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():  # scaled-up head weights: logits large enough for soft-capping to bend them
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def reference_logprobs(model, prompt, prompt_mask, response, response_mask, temperature=1.0) -> torch.Tensor:
    """log π(token) from one full padded forward, by hand: the logits at t-1 predict token t ``(B, R)``."""
    sequences = torch.cat([prompt, response], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions(mask)).logits.float()
    width = prompt.shape[1]
    predicting = logits[:, width - 1 : -1] / temperature
    logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    return logprobs * response_mask


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_packed_and_padded_passes_give_the_models_own_log_probs(arch):
    model = model_for(arch)
    prompt, prompt_mask, response, response_mask = buffer()
    expected = reference_logprobs(model, prompt, prompt_mask, response, response_mask)
    sequences = torch.cat([prompt, response], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    with torch.no_grad():
        for packed in (False, True):
            forward = ResponseForward(sequences, attention, positions(attention), response_mask, packed)
            if packed:
                assert forward.inputs["input_ids"].shape[0] == 3  # rows of 3 + 3 tokens share a bin of 8
            torch.testing.assert_close(forward.scatter(forward.token_logprobs(model)), expected,
                                       msg=f"packed={packed}")
        # the bare LM head on the hidden states misses what these architectures do after it
        hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
        bare = model.get_output_embeddings()(hidden)
        full = model(input_ids=sequences, attention_mask=attention).logits
    post_processed = arch in ("gemma2", "granite")
    assert (bare - full).abs().max() > 0.1 if post_processed else torch.allclose(bare, full, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_response_log_prob_sums_and_value_head_logits_are_the_models_own(arch):
    """Evaluation and SFT validation (sums over right-padded rows) and the RM's LM loss (a value-head model's
    logits) read the same numbers as the model's forward."""
    model = model_for(arch)
    batch = collate([([3, 5, 6, 14, 15, EOS], 3), ([3, 8, 16, EOS], 2)], PAD)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
            -1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        expected = (logprobs * batch.response_mask[:, 1:]).sum(dim=1)
        value_model = ValueHeadModel(model)
        values, head_logits = value_model(batch.input_ids, batch.attention_mask, return_lm_logits=True)
        for packed in (False, True):
            for chunk_tokens in (4096, 6):  # one pass, or one row per pass
                sums, counts = response_logprob_sums(model, batch, packed=packed, chunk_tokens=chunk_tokens)
                torch.testing.assert_close(sums, expected)
                assert counts.tolist() == [3.0, 2.0]
            # the reward model's one pass: values at the last token and its LM head's log-probs
            forward = ResponseForward.of_tokens(batch, packed)
            last, token_logprobs = forward.last_values_and_token_logprobs(value_model)
            torch.testing.assert_close(last, values[[0, 1], [5, 3]])
            torch.testing.assert_close(forward.scatter(token_logprobs).sum(dim=1), expected)
    torch.testing.assert_close(head_logits, logits)


def test_a_model_that_ignores_logits_to_keep_is_refused():
    class AllPositions(FixedLogits):
        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
            return super().forward(input_ids, logits_to_keep=0)

    prompt, prompt_mask, response, response_mask = buffer()
    sequences, attention = torch.cat([prompt, response], dim=1), torch.cat([prompt_mask, response_mask], dim=1)
    for packed in (False, True):
        forward = ResponseForward(sequences, attention, positions(attention), response_mask, packed)
        with pytest.raises(ValueError, match="must honour transformers' logits_to_keep"):
            forward.token_logits(AllPositions([0.0] * VOCAB))


class FixedLogits(nn.Module):
    """A causal LM stub whose logits are the same at every position; it honours ``logits_to_keep``."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("row", torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        width = len(logits_to_keep) if torch.is_tensor(logits_to_keep) else logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.row.expand(input_ids.shape[0], width, len(self.row)))


class LastTokenScore(nn.Module):
    """A value model whose value at a position is 10 x the token id there (so a score names its token)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_lm_logits=False):
        return 10.0 * input_ids.float(), None


@pytest.mark.parametrize("packing", [False, True])
def test_log_probs_and_kl_read_the_tempered_distribution(packing):
    """At T = 0.5 a policy with logits (0, 0, ln 4) samples from (0, 0, ln 16)/... : p(2) = 16/18; the
    reference's uniform logits stay uniform, p(2) = 1/3; the k1 KL of token 2 is ln(16/18) - ln(1/3) = ln(8/3)."""
    policy, reference = FixedLogits([0.0, 0.0, math.log(4.0)]), FixedLogits([0.0, 0.0, 0.0])
    prompt, response = torch.tensor([[0, 2]]), torch.tensor([[2, 2, 1]])
    exp = score_rollouts(policy, reference, LastTokenScore(), LastTokenScore(), prompt, torch.ones_like(prompt),
                         response, torch.ones_like(response), 1, [1], packing=packing, temperature=0.5)
    logp2, logp1 = math.log(16 / 18), math.log(1 / 18)
    torch.testing.assert_close(exp.old_logprobs, torch.tensor([[logp2, logp2, logp1]]))
    torch.testing.assert_close(exp.ref_logprobs, torch.full((1, 3), math.log(1 / 3)))
    kl = F.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k1")
    torch.testing.assert_close(kl, torch.tensor([[math.log(8 / 3), math.log(8 / 3), math.log(1 / 6)]]))
    assert exp.truncated.tolist() == [False] and exp.raw_scores.tolist() == [10.0]  # scored at its EOS


def test_a_truncated_response_is_scored_with_eos_appended():
    response = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, 4], [5, 3, PAD, PAD]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # stop tokens: EOS and 3 (another end-of-turn token the model's generation config names)
    scored, scored_mask, truncated = as_scored(response, response_mask, [EOS, 3], EOS)
    assert truncated.tolist() == [False, True, False]
    assert scored[1].tolist() == [7, 8, 9, 4, EOS] and scored[0, :3].tolist() == [5, 6, EOS]
    assert scored[2, :2].tolist() == [5, EOS]  # the RM reads EOS, the token it was trained on
    assert scored_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    response, response_mask = response[:2], response_mask[:2]
    prompt = torch.tensor([[3, 3], [3, 3]])
    uniform = FixedLogits([0.0] * 10)
    for packing in (False, True):
        exp = score_rollouts(uniform, uniform, LastTokenScore(), LastTokenScore(), prompt, torch.ones_like(prompt),
                             response, response_mask, EOS, [EOS], packing=packing)
        # the RM reads EOS in both rows (10 x EOS id); the policy's buffer keeps the sampled tokens only
        assert exp.raw_scores.tolist() == [10.0 * EOS, 10.0 * EOS] and exp.truncated.tolist() == [False, True]
        assert exp.response_mask.tolist() == response_mask.tolist()
