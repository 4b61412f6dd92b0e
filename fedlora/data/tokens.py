"""Examples to token ids with the loss on the answer only, and padded training batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from fedlora.data.errors import DataError
from fedlora.seeds import data_rng

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


def tokenize(examples: list[dict], tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Token ids and labels, with the loss on the answer only.

    Each example becomes ``{"input_ids": [...], "labels": [...]}`` of equal length,
    where ``labels`` is ``-100`` on every token that is not part of the final assistant
    answer (system, user, earlier turns, template markup) and equals ``input_ids`` on
    the answer and its end-of-turn token.

    With ``tokenizer.chat_template`` the text is the chat template's rendering; without
    one it is ``"### Instruction:\\n{user}\\n\\n### Response:\\n{answer}"`` + EOS. The
    prompt and the answer are tokenised separately (exactly what the model sees at
    generation time: the prompt alone, then its own answer tokens).

    Sequences longer than ``max_seq_len`` lose prompt tokens from the left first (but
    at least a quarter of the budget, or the whole answer if shorter, stays answer),
    then the end of the answer. Examples left with no answer token after the first
    position (which no causal-LM loss can score) are dropped, so the result may be
    shorter than ``examples``.
    """
    if max_seq_len < 1:
        raise DataError(f"max_seq_len={max_seq_len} must be >= 1")
    parts = [_split_text(_messages(ex, i), tokenizer) for i, ex in enumerate(examples)]
    plain = not getattr(tokenizer, "chat_template", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    prompt_ids = _encode(tokenizer, [p for p, _, _ in parts])
    answer_ids = _encode(tokenizer, [a for _, a, _ in parts])
    tail_ids = _encode(tokenizer, [t for _, _, t in parts])
    out: list[dict[str, list[int]]] = []
    for prompt, answer, tail in zip(prompt_ids, answer_ids, tail_ids):
        if plain and eos_id is not None:
            answer = answer + [eos_id]
        item = _truncate(prompt, answer, tail, max_seq_len)
        if item is not None:
            out.append(item)
    if len(out) < len(examples):
        log.info("tokenize: dropped %d of %d examples with no answer token left at max_seq_len=%d",
                 len(examples) - len(out), len(examples), max_seq_len)
    return out


def batches(
    tokenized: list[dict], batch_size: int, pad_id: int, *, shuffle: bool, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``tokenized`` in batches of ``batch_size`` (the last may be smaller).

    Each batch is right-padded to its longest sequence and holds ``input_ids`` (pad =
    ``pad_id``), ``attention_mask`` (1 on tokens, 0 on padding) and ``labels`` (-100 on
    padding), all ``torch.long`` of shape ``(batch, longest)``. With ``shuffle`` the
    order is a permutation fixed by ``seed``; without, it is the input order.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    order = list(range(len(tokenized)))
    if shuffle:
        data_rng("batches", seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        items = [tokenized[i] for i in order[start : start + batch_size]]
        longest = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(it["labels"], dtype=torch.long)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def generation_prompt(messages: list[dict], tokenizer: Any) -> str:
    """The text a model continues to answer ``messages`` (the turns before the answer): the chat
    template with its generation prompt, or the plain ``### Instruction`` prompt without one --
    the prompt :func:`tokenize` trains the answer after."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain_prompt(messages)


def _messages(example: dict, index: int) -> list[dict]:
    messages = example.get("messages") if isinstance(example, dict) else None
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(
            f"example {index}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}} "
            "with the assistant answer last"
        )
    return messages


def _split_text(messages: list[dict], tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, answer, tail) texts: only ``answer`` carries loss.

    ``answer`` is the final assistant content plus the template's end-of-turn markup
    (e.g. ``<|im_end|>``) so the model learns to stop; ``tail`` is trailing template
    whitespace after it.
    """
    answer = messages[-1]["content"]
    if not getattr(tokenizer, "chat_template", None):
        return _plain_prompt(messages[:-1]), answer, ""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        # Some templates render earlier turns differently once a later turn exists (e.g.
        # dropping reasoning); the shared prefix is then the prompt.
        prompt = full[: _common_prefix(full, prompt)]
    completion = full[len(prompt):]
    start = completion.find(answer.strip()) if answer.strip() else -1
    if start < 0:
        # The template rewrote the answer: train on the whole rendered completion.
        start = 0
    end = len(completion.rstrip())
    return prompt + completion[:start], completion[start:end], completion[end:]


def _plain_prompt(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"{m['content']}\n\n")
        else:
            parts.append(f"### Instruction:\n{m['content']}\n\n### Response:\n")
    # Earlier assistant turns already end with a response; the final prompt must too.
    if not parts or not parts[-1].endswith("### Response:\n"):
        parts.append("### Response:\n")
    return "".join(parts)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _truncate(prompt: list[int], answer: list[int], tail: list[int], max_len: int) -> dict[str, list[int]] | None:
    """Fit prompt+answer+tail into ``max_len``; None when no answer token can be scored."""
    if not answer:
        return None
    if len(prompt) + len(answer) + len(tail) > max_len:
        tail = tail[: max(0, max_len - len(prompt) - len(answer))]
        reserve = min(len(answer), max(1, max_len // 4))
        keep = min(len(prompt), max_len - reserve)
        prompt = prompt[len(prompt) - keep:]
        answer = answer[: max_len - len(prompt)]
    # A causal LM never predicts position 0, so an answer there has nothing to learn.
    if not answer or not prompt:
        return None
    return {
        "input_ids": prompt + answer + tail,
        "labels": [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(tail),
    }
