"""The instruction judge: each score against a direct computation on the tiny model (the whole
instructed conversation rendered by the chat template, one forward, full logits, plain
log_softmax), its shape rules, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from steer.errors import InvalidInput
from steer.principles import instructed_messages
from steer.rewards.principle_judge import INSTRUCTION_TEMPLATES, JUDGE_METHODS, JudgedPrinciple, PrincipleJudge

SHORT = JudgedPrinciple.from_statement("shorter", "Select the shorter response.", "short and to the point",
                                       "long-winded and wordy")
# two instructions for, one against: the score averages each side
KIND = JudgedPrinciple("kind", "Select the kinder response.", ("Thank you.",), ("That was rude.",),
                       instructions=("Be kind.", "Answer warmly and kindly."), counter_instructions=("Be rude.",))
NO_INSTRUCTIONS = JudgedPrinciple("polite", "Select the more polite response.", ("Thanks.",), ("Rude.",),
                                  source="p.json:4")


def direct_loglik(model, tokenizer, messages, response) -> float:
    """Summed log p of the response's tokens and the end-of-turn token after the generation prompt."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + r_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]  # (T - 1,)
    return logp[len(p_ids) - 1:].sum().item()


def test_statement_gives_instructions_from_the_templates():
    assert SHORT.instructions == ("Make your answer short and to the point.",)
    assert SHORT.counter_instructions == ("Make your answer long-winded and wordy.",)
    assert INSTRUCTION_TEMPLATES["positive"][0].format(statement="x") == "Make your answer x."
    assert SHORT.to_dict()["instructions"] == list(SHORT.instructions)
    assert "instructions" not in NO_INSTRUCTIONS.to_dict()


def test_instruction_scores_equal_a_direct_computation(tiny_loaded):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    france = [{"role": "user", "content": "What is the capital of France?"}]
    system = [{"role": "system", "content": "You answer questions."}, {"role": "user", "content": "Name a colour."}]
    conversations = [france, france, system, france]
    responses = ["Paris.", "Paris, which has been the capital for centuries and is home to the Louvre.", "Blue.",
                 "Paris."]  # the last repeats the first: the same score
    judge = PrincipleJudge(model, tokenizer, [SHORT, KIND], batch_size=2, prefix_batch=1, method="instruction")
    got = judge.scores(conversations, responses)  # (4, 2)
    assert got.shape == (4, 2)
    for i, (conv, response) in enumerate(zip(conversations, responses)):
        for k, p in enumerate((SHORT, KIND)):
            plus = [direct_loglik(model, tokenizer, instructed_messages(conv, t), response) for t in p.instructions]
            minus = [direct_loglik(model, tokenizer, instructed_messages(conv, t), response)
                     for t in p.counter_instructions]
            expected = sum(plus) / len(plus) - sum(minus) / len(minus)
            assert got[i, k].item() == pytest.approx(expected, abs=1e-3), (i, p.id)
    assert got[0].tolist() == pytest.approx(got[3].tolist(), abs=1e-5)
    assert got[0].ne(got[1]).all()


def test_swapping_instructions_negates_the_score(tiny_loaded):
    swapped = JudgedPrinciple("longer", "Select the longer response.", SHORT.negative, SHORT.positive,
                              instructions=SHORT.counter_instructions, counter_instructions=SHORT.instructions)
    conv = [{"role": "user", "content": "Why is the sky blue?"}]
    judge = PrincipleJudge(tiny_loaded.model, tiny_loaded.tokenizer, [SHORT, swapped], method="instruction")
    got = judge.scores([conv, conv], ["Scattering.", "Because air scatters blue light more than red light."])
    assert got[:, 0].tolist() == pytest.approx((-got[:, 1]).tolist(), abs=1e-5)


def test_instruction_judge_refuses_a_principle_without_instructions(tiny_loaded):
    with pytest.raises(InvalidInput) as e:
        PrincipleJudge(tiny_loaded.model, tiny_loaded.tokenizer, [SHORT, NO_INSTRUCTIONS], method="instruction")
    assert "polite (p.json:4)" in e.value.reason and "--judge followup" in e.value.reason
    PrincipleJudge(tiny_loaded.model, tiny_loaded.tokenizer, [NO_INSTRUCTIONS], method="followup")  # fine there


def test_unknown_method_and_half_given_instructions_are_refused(tiny_loaded):
    with pytest.raises(InvalidInput, match="judge: must be one of instruction, followup"):
        PrincipleJudge(tiny_loaded.model, tiny_loaded.tokenizer, [SHORT], method="pairwise")
    with pytest.raises(ValueError, match="come together"):
        JudgedPrinciple("x", "X", ("a",), ("b",), instructions=("Do x.",))


def test_settings_offer_the_judge_methods():
    from steer.training.judge_settings import JUDGE_METHODS as OFFERED

    assert OFFERED == JUDGE_METHODS
