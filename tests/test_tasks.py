"""Task accuracy (fedlora.tasks): options by log-likelihood, generated answers, the wearable advice read back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlora.data import DataError, eval_examples
from fedlora.data.tokens import generation_prompt
from fedlora.data.wearable import _ADVICE_RULES, IN_RANGE, advice_fields, wearable_advice, wearable_records
from fedlora.model import load_tokenizer
from fedlora.roles.device import lora_model
from fedlora.tasks import (
    ChoiceItem,
    choice_items,
    choice_prompt,
    choice_scores,
    generate_answers,
    generation_scores,
    macro_f1,
    option_logprobs,
)


class FixedPreference(torch.nn.Module):
    """A stand-in language model whose next-token distribution is the same everywhere: softmax(bias)."""

    def __init__(self, vocab: int, favoured: dict[int, float]):
        super().__init__()
        self.bias = torch.zeros(vocab)
        for token, logit in favoured.items():
            self.bias[token] = logit
        self.calls: list[int] = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.shape[0])
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())


@pytest.fixture(scope="module")
def tokenizer(tiny_config):
    return load_tokenizer(tiny_config().model)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_option_the_model_favours_is_chosen_with_its_exact_log_probability(tokenizer):
    options = ("yes", "no", "maybe")
    no = _ids(tokenizer, "no")[0]
    model = FixedPreference(len(tokenizer), {no: 6.0})
    items = [ChoiceItem(choice_prompt(q, options), options, answer) for q, answer in (("Is water wet?", 1), ("Is fire cold?", 0))]
    lp = option_logprobs(model, tokenizer, items, max_seq_len=512, batch_size=8)
    table = torch.log_softmax(model.bias, dim=-1)
    for item_lp in lp:
        for option, got in zip(options, item_lp):
            assert got == pytest.approx(float(sum(table[t] for t in _ids(tokenizer, option))), abs=1e-5)
    scores = choice_scores(items, lp)
    assert scores["predicted"] == ["no", "no"]
    assert scores["acc"] == 0.5 and scores["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    # Single-token options after one prompt need one forward pass between them: two prompts, two inputs.
    assert sum(model.calls) == 2


def test_length_normalisation_can_change_the_choice(tokenizer):
    # Two options: a one-token one and a longer one whose every token is favoured a bit less than the
    # one-token option's: the sum prefers the short option, the per-byte score the long one.
    short, long_ = "A", "London Paris London"
    a, london, paris = _ids(tokenizer, "A")[0], _ids(tokenizer, "London")[0], _ids(tokenizer, " Paris")[0]
    model = FixedPreference(len(tokenizer), {a: 9.0, london: 8.5, paris: 8.5, _ids(tokenizer, " London")[0]: 8.5})
    items = [ChoiceItem(choice_prompt("Which?", (short, long_)), (short, long_), 1)]
    lp = option_logprobs(model, tokenizer, items, max_seq_len=512, batch_size=8)
    assert lp[0][0] > lp[0][1]  # the sum: short
    assert lp[0][1] / len(long_.encode()) > lp[0][0] / len(short.encode())  # per byte: long
    scores = choice_scores(items, lp)
    assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)


def test_shared_forward_passes_give_what_one_pass_per_option_gives(tiny_config, tokenizer):
    """On the tiny model: each option's score equals a plain forward pass of prompt + option."""
    model, tok = lora_model(tiny_config(), freeze_a=False)
    items = choice_items([{"question": "Do statins lower LDL?", "context": "A trial of 300 adults.", "label": "yes"},
                          {"question": "Capital?", "options": ["Paris", "London Paris"], "answer": 0}])
    lp = option_logprobs(model, tok, items, max_seq_len=256, batch_size=2)
    for item, item_lp in zip(items, lp):
        prompt = _ids(tok, generation_prompt(item.prompt, tok))
        for option, got in zip(item.options, item_lp):
            ids = _ids(tok, option)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
            table = torch.log_softmax(logits, dim=-1)
            want = sum(float(table[len(prompt) - 1 + k, t]) for k, t in enumerate(ids))
            assert got == pytest.approx(want, abs=1e-4)


def test_labelled_rows_pubmedqa_layout_and_errors():
    items = choice_items([{"question": "Q?", "context": "Abstract.", "long_answer": "...", "label": "maybe"},
                          {"question": "Q2?", "options": ["A", "B", "C"], "answer": 2}])
    assert items[0].options == ("yes", "no", "maybe") and items[0].answer == 2
    assert items[0].prompt[0]["content"].startswith("Abstract.\n\nQuestion: Q?")
    assert items[1].answer == 2
    with pytest.raises(DataError, match="row 0: its 'answer'/'label' 'perhaps'"):
        choice_items([{"question": "Q?", "label": "perhaps"}])
    with pytest.raises(DataError, match="row 0: no 'question'"):
        choice_items([{"label": "yes"}])


def test_macro_f1():
    assert macro_f1(["yes", "no", "yes"], ["yes", "no", "yes"]) == 1.0
    # yes: tp 1, fp 1, fn 1 -> 0.5; no: tp 0 -> 0
    assert macro_f1(["yes", "no", "yes"], ["yes", "yes", "no"]) == pytest.approx(0.25)


def test_the_advice_read_back_gives_the_rules_verdicts():
    records = [r for pid in range(8) for r in wearable_records(7, pid, 20)]
    for r in records:
        fields = advice_fields(wearable_advice(r))
        for name, key, flag_of in _ADVICE_RULES:
            if r[key] is None:
                assert name not in fields
            else:
                assert fields[name] == (flag_of(r) or IN_RANGE), (name, r)
    flagged = sum(v != IN_RANGE for r in records for v in advice_fields(wearable_advice(r)).values())
    assert 0 < flagged < sum(len(advice_fields(wearable_advice(r))) for r in records)


def test_a_wrong_number_costs_one_field_and_the_exact_match():
    record = next(r for r in wearable_records(3, 1, 50) if r["sleep"] < 6 and r["steps"] is not None)
    reference = wearable_advice(record)
    wrong = reference.replace(f"Sleep {record['sleep']} h", f"Sleep {record['sleep'] + 1.0:.1f} h")
    assert wrong != reference
    n = len(advice_fields(reference))
    scores = generation_scores([reference, wrong], [reference, reference], advice_fields)
    assert scores["exact_match"] == 0.5
    assert scores["field_accuracy"] == pytest.approx((2 * n - 1) / (2 * n))
    assert scores["all_fields"] == 0.5
    # A field said twice is contradictory, not right.
    twice = reference + " " + next(v for v in advice_fields(reference).values() if v != IN_RANGE)
    assert generation_scores([twice], [reference], advice_fields)["field_accuracy"] == pytest.approx((n - 1) / n)
    assert generation_scores([""], [reference], advice_fields)["field_accuracy"] == 0.0


def test_generated_answers_do_not_depend_on_the_batch(tiny_config):
    """Left padding: a prompt answered in a batch with longer ones gets the answer it gets alone."""
    cfg = tiny_config("data.records_per_client=12")
    model, tok = lora_model(cfg, freeze_a=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that moves the tiny model off its one favourite token ("\n")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    prompts = [ex["messages"][:-1] for ex in eval_examples(cfg.data, 8, cfg.seed)[:3]]
    together = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone and all(together)
    assert tok.padding_side == "right"  # restored for training
