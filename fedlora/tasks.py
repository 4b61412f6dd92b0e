"""Task accuracy on labelled data, beside held-out loss (FlowerTune ranks federated LLMs by it).

Two ways to score a model, as lm-eval-harness does:

* **options by log-likelihood** (:func:`choice_scores`): multiple-choice and yes/no/maybe questions.
  Each option's tokens are scored after the prompt (the chat template's generation prompt, as
  training renders it; the option tokenised on its own, as an answer is in training); the
  prediction is the option with the highest sum of token log-probabilities (``acc``), or the
  highest sum per byte of the option's text (``acc_norm``, the harness's length normalisation).
  Options that need the same forward pass (e.g. single-token ``yes``/``no``/``maybe`` after one
  prompt) share it.
* **generated answers** (:func:`generation_scores`): greedy decoding, then exact match of the
  whole answer (whitespace collapsed) and, given a field reader, the share of the reference's
  fields the answer gets right (the wearable advice: :func:`fedlora.data.wearable.advice_fields`).

Labelled rows (:func:`choice_items`): ``question`` (+ optional ``context``), ``options`` (a list;
default ``yes, no, maybe``) and the gold ``answer`` or ``label`` (an option's text or index) --
PubMedQA's rows as they come.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.config import FedLoraConfig
from fedlora.data import DataError, eval_examples
from fedlora.data.tokens import generation_prompt
from fedlora.data.wearable import advice_fields
from fedlora.model import adapters_off

YES_NO_MAYBE = ("yes", "no", "maybe")
CHOICE_METHOD = ("log-likelihood of each option's tokens after the prompt (lm-eval-harness): acc = highest sum, "
                 "acc_norm = highest sum per byte of the option")


@dataclass(frozen=True)
class ChoiceItem:
    """One labelled question: the turns before the answer, its options and the gold option's index."""

    prompt: list[dict]
    options: tuple[str, ...]
    answer: int


def choice_prompt(question: str, options: tuple[str, ...], context: str = "") -> list[dict]:
    """The user turn that asks ``question`` (after ``context``) and names the options to answer with."""
    text = f"{context.strip()}\n\n" if context.strip() else ""
    text += f"Question: {question.strip()}\nAnswer with one of: {', '.join(options)}."
    return [{"role": "user", "content": text}]


def choice_items(rows: list[Mapping[str, Any]]) -> list[ChoiceItem]:
    """Labelled rows as items; DataError naming the row for a row without a question or a gold option."""
    items = []
    for i, row in enumerate(rows):
        options = tuple(str(o).strip() for o in row.get("options") or YES_NO_MAYBE)
        gold = row.get("answer") if row.get("answer") is not None else row.get("label")  # a table has both columns
        question = str(row.get("question") or "").strip()
        if not question:
            raise DataError(f"row {i}: no 'question'")
        if len(options) < 2 or len(set(options)) < len(options):
            raise DataError(f"row {i}: 'options' must be two or more different answers, got {list(options)}")
        if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options):
            answer = gold
        elif isinstance(gold, str) and gold.strip().lower() in (o.lower() for o in options):
            answer = [o.lower() for o in options].index(gold.strip().lower())
        else:
            raise DataError(f"row {i}: its 'answer'/'label' {gold!r} is none of its options {list(options)} (or an index)")
        items.append(ChoiceItem(choice_prompt(question, options, str(row.get("context") or "")), options, answer))
    return items


def option_logprobs(model: torch.nn.Module, tokenizer: Any, items: list[ChoiceItem], *, max_seq_len: int,
                    batch_size: int) -> list[list[float]]:
    """Per item, per option: the sum of the log-probabilities of the option's tokens after the prompt.

    A prompt longer than ``max_seq_len`` less the option loses tokens from the left (as in training).
    Each distinct input (prompt + all option tokens but the last) is run once."""
    wanted: list[tuple[int, int, list[int], list[int]]] = []  # (item, option, input ids, option ids)
    for i, item in enumerate(items):
        prompt = _ids(tokenizer, generation_prompt(item.prompt, tokenizer))
        for j, option in enumerate(item.options):
            ids = _ids(tokenizer, option)
            if not ids:
                raise DataError(f"item {i}: option {option!r} has no tokens")
            keep = max(1, max_seq_len - len(ids) + 1)
            wanted.append((i, j, (prompt + ids[:-1])[-keep:], ids))
    inputs = sorted({tuple(w[2]) for w in wanted}, key=len)
    log_probs: dict[tuple[int, ...], torch.Tensor] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            longest = max(len(c) for c in chunk)
            pad = tokenizer.pad_token_id or 0
            ids = torch.tensor([list(c) + [pad] * (longest - len(c)) for c in chunk], dtype=torch.long)
            mask = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in chunk], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for row, c in enumerate(chunk):
                log_probs[c] = torch.log_softmax(logits[row, : len(c)], dim=-1)
    model.train(was_training)
    scores = [[0.0] * len(item.options) for item in items]
    for i, j, inp, ids in wanted:
        lp = log_probs[tuple(inp)]
        positions = range(len(inp) - len(ids), len(inp))  # the logits that predict each option token
        scores[i][j] = float(sum(lp[p, t] for p, t in zip(positions, ids)))
    return scores


def choice_scores(items: list[ChoiceItem], logprobs: list[list[float]]) -> dict[str, Any]:
    """Accuracy of the log-likelihood choice (``acc``: sum; ``acc_norm``: per byte) and the macro-F1 of ``acc``'s
    predictions over the gold options' texts; ``predicted``: each item's ``acc`` choice."""
    if not items:
        raise DataError("no labelled items to score")
    predicted, normed = [], []
    for item, lp in zip(items, logprobs):
        predicted.append(max(range(len(lp)), key=lambda j: lp[j]))
        normed.append(max(range(len(lp)), key=lambda j: lp[j] / max(1, len(item.options[j].encode()))))
    n = len(items)
    gold = [item.options[item.answer] for item in items]
    chosen = [item.options[p] for item, p in zip(items, predicted)]
    return {
        "examples": n,
        "acc": sum(p == item.answer for p, item in zip(predicted, items)) / n,
        "acc_norm": sum(p == item.answer for p, item in zip(normed, items)) / n,
        "macro_f1": macro_f1(gold, chosen),
        "predicted": chosen,
    }


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    """Mean over the gold labels of each label's F1 (a label never predicted nor gold is not counted)."""
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict]], *, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers to each prompt (the turns before the answer), decoded without special tokens."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [generation_prompt(p, tokenizer) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def normalise(text: str) -> str:
    """Whitespace collapsed and trimmed: what exact match compares."""
    return " ".join(text.split())


def generation_scores(predicted: list[str], references: list[str],
                      fields: Callable[[str], dict[str, str]] | None = None) -> dict[str, Any]:
    """Exact match of each answer with its reference and, given ``fields`` (text -> field -> value), the share of
    the references' fields the answers give the same value (``field_accuracy``) and the share of answers whose
    fields all match (``all_fields``)."""
    if not references or len(predicted) != len(references):
        raise DataError(f"{len(predicted)} answers for {len(references)} references")
    n = len(references)
    out: dict[str, Any] = {"examples": n,
                           "exact_match": sum(normalise(p) == normalise(r) for p, r in zip(predicted, references)) / n}
    if fields is not None:
        right = total = whole = 0
        for p, r in zip(predicted, references):
            want, got = fields(r), fields(p)
            hits = sum(got.get(k) == v for k, v in want.items())
            right, total, whole = right + hits, total + len(want), whole + (hits == len(want) and got.keys() == want.keys())
        out["field_accuracy"] = right / total if total else None
        out["all_fields"] = whole / n
    return out


def answer_scores(model: torch.nn.Module, tokenizer: Any, examples: list[dict], *, batch_size: int,
                  fields: Callable[[str], dict[str, str]] | None = None) -> dict[str, Any]:
    """:func:`generation_scores` of the model's greedy answers to chat examples (their last turn is the reference;
    at most the longest reference's tokens + 16 are generated)."""
    if not examples:
        raise DataError("no examples to answer")
    references = [ex["messages"][-1]["content"] for ex in examples]
    longest = max(len(_ids(tokenizer, r)) for r in references)
    answers = generate_answers(model, tokenizer, [ex["messages"][:-1] for ex in examples], max_new_tokens=longest + 16,
                               batch_size=batch_size)
    return generation_scores(answers, references, fields)


def advice_accuracy(model: Any, tokenizer: Any, examples: list[dict], *, batch_size: int) -> dict[str, Any]:
    """The wearable advice the base and the model's active adapter generate for ``examples``, each scored against
    the reference the advice rules wrote (:func:`answer_scores` with
    :func:`~fedlora.data.wearable.advice_fields`): ``{"base": {...}, "adapter": {...}}``. ``model``: a PEFT model."""
    with adapters_off(model):
        base = answer_scores(model, tokenizer, examples, batch_size=batch_size, fields=advice_fields)
    adapter = answer_scores(model, tokenizer, examples, batch_size=batch_size, fields=advice_fields)
    return {"base": base, "adapter": adapter}


def run_advice_accuracy(cfg: FedLoraConfig, model: Any, tokenizer: Any) -> dict[str, Any] | None:
    """The end of a wearable run: :func:`advice_accuracy` on the first ``data.accuracy_examples`` of the run's
    held-out examples, with the seconds it took; None for other data or ``data.accuracy_examples=0``."""
    n = cfg.data.accuracy_examples
    if cfg.data.source != "wearable" or n == 0:
        return None
    started = time.perf_counter()
    examples = eval_examples(cfg.data, cfg.federation.num_clients, cfg.seed)[:n]
    scores = advice_accuracy(model, tokenizer, examples, batch_size=len(examples))  # one batch: fewest decoding steps
    return {**scores, "seconds": time.perf_counter() - started}


def advice_line(accuracy: Mapping[str, Any]) -> str:
    """One line of :func:`run_advice_accuracy`'s result, base -> adapter."""
    base, tuned = accuracy["base"], accuracy["adapter"]
    return (f"advice accuracy on {tuned['examples']} held-out questions (generated, scored against the advice rules): "
            f"fields {base['field_accuracy']:.0%} -> {tuned['field_accuracy']:.0%}, "
            f"whole answers exact {base['exact_match']:.0%} -> {tuned['exact_match']:.0%} (base -> adapter)")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
