"""Each client's private instruction examples, and turning them into training batches.

An *example* is ``{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}`` (an optional leading ``system`` message and
earlier turns allowed); the LAST message is the assistant answer the loss is on.

Two sources (``DataConfig.source``):

* ``wearable`` (default, no download): every client generates its own health-tracker
  records from ``(seed, partition_id)``. A client's id picks a user profile (athlete,
  type-2 diabetic, ...) that shifts its readings, so clients are non-IID; the answer is
  a deterministic, templated function of the readings (:func:`wearable_advice`), so a
  small model can learn it within a few dozen LoRA steps.
* ``file``: a local JSON/JSONL/CSV/Parquet instruction dataset (Alpaca or chat
  ``messages`` layout) split across clients with flwr-datasets partitioners.

Everything is deterministic given its arguments, in every process: randomness comes
from :class:`random.Random` seeded with strings (:func:`fedlora.seeds.data_rng`; never ``hash()``, which
Python randomises per process) and from the partitioners' own seeded generators.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import DataConfig
from fedlora.seeds import data_rng

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Partition key derived from the question text when a file has no such column.
QUESTION_TYPE = "question_type"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ALPACA_FIELDS = ("instruction", "input", "output")
PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


class DataError(ValueError):
    """Bad or missing data file, unknown fields, or a partitioning that cannot work.

    The message names the file or setting and what would be accepted.
    """


# --------------------------------------------------------------------------- public API


def client_examples(
    cfg: DataConfig, partition_id: int, num_partitions: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, held_out) examples of client ``partition_id`` out of ``num_partitions``.

    Deterministic given the arguments (and the file's contents for ``source=file``),
    in any process. Both lists are fresh copies the caller may modify. ``train`` is
    never empty; ``held_out`` is non-empty whenever the client has two or more examples
    (always, for ``wearable``).
    """
    if num_partitions < 1:
        raise DataError(f"num_partitions={num_partitions} must be >= 1")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition_id={partition_id} must be in [0, {num_partitions - 1}]")
    if cfg.source == "wearable":
        if cfg.records_per_client < 2:
            raise DataError(
                f"data.records_per_client={cfg.records_per_client} must be >= 2 "
                "(at least one training and one held-out record per client)"
            )
        records = wearable_records(seed, partition_id, cfg.records_per_client)
        examples = [record_example(r) for r in records]
        n_eval = _held_out_count(len(examples), cfg.eval_fraction)
        # Records are i.i.d. draws, so the first ones are as good a held-out set as any.
        return examples[n_eval:], examples[:n_eval]
    if cfg.source == "file":
        rows = _file_partition(cfg, partition_id, num_partitions, seed)
        order = list(range(len(rows)))
        data_rng("heldout", seed, partition_id).shuffle(order)
        n_eval = _held_out_count(len(rows), cfg.eval_fraction)
        held_out = [_copy_example(rows[i]) for i in order[:n_eval]]
        train = [_copy_example(rows[i]) for i in order[n_eval:]]
        return train, held_out
    raise DataError(f"data.source={cfg.source!r} is not one of: wearable, file")


def eval_examples(cfg: DataConfig, num_partitions: int, seed: int) -> list[dict]:
    """All clients' held-out examples, deterministically cut to ``cfg.max_eval_examples``.

    The cut takes examples round-robin across clients (client 0's first, client 1's
    first, ..., then everyone's second, ...) so every client stays represented even
    when the cap is far below the union's size.
    """
    per_client = [client_examples(cfg, pid, num_partitions, seed)[1] for pid in range(num_partitions)]
    out: list[dict] = []
    depth = 0
    while len(out) < cfg.max_eval_examples and any(depth < len(h) for h in per_client):
        for held in per_client:
            if depth < len(held) and len(out) < cfg.max_eval_examples:
                out.append(held[depth])
        depth += 1
    return out


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


# ------------------------------------------------------------------ wearable generator


@dataclass(frozen=True)
class Profile:
    """A kind of wearable user: reading distributions and how they phrase questions.

    Each ``(mean, sd)`` pair parameterises a normal draw; ``pregnant`` switches the
    advice to pregnancy glucose targets and the gestational-hypertension threshold
    (and every question of this profile says so, so the switch is learnable).
    """

    name: str
    intros: tuple[str, ...]
    hr: tuple[float, float]
    fasting_share: float
    fasting: tuple[float, float]
    post_meal: tuple[float, float]
    sys: tuple[float, float]
    dia: tuple[float, float]
    sleep: tuple[float, float]
    steps_share: float
    steps: tuple[float, float]
    pregnant: bool = False


PROFILES: tuple[Profile, ...] = (
    Profile("endurance athlete", ("I'm training for a marathon.", "Endurance athlete here."),
            hr=(49, 5), fasting_share=0.7, fasting=(86, 8), post_meal=(118, 15),
            sys=(114, 8), dia=(71, 6), sleep=(8.0, 0.7), steps_share=0.9, steps=(16000, 4000)),
    Profile("type-2 diabetic", ("I have type 2 diabetes.", "Type 2 diabetic here."),
            hr=(78, 8), fasting_share=0.5, fasting=(150, 30), post_meal=(215, 40),
            sys=(132, 10), dia=(83, 7), sleep=(6.8, 0.8), steps_share=0.6, steps=(5000, 2000)),
    Profile("hypertensive office worker", ("I work long hours at a desk and have high blood pressure.",
                                           "Office worker with hypertension."),
            hr=(77, 8), fasting_share=0.6, fasting=(98, 10), post_meal=(135, 20),
            sys=(147, 12), dia=(94, 8), sleep=(6.5, 0.7), steps_share=0.7, steps=(4000, 1500)),
    Profile("night-shift worker", ("I work night shifts.", "Night-shift nurse here."),
            hr=(74, 7), fasting_share=0.5, fasting=(100, 10), post_meal=(145, 20),
            sys=(125, 10), dia=(80, 7), sleep=(5.2, 0.9), steps_share=0.6, steps=(7000, 2500)),
    Profile("healthy senior", ("I'm 72 and in good health.", "Retiree here, 70 years old."),
            hr=(66, 6), fasting_share=0.7, fasting=(95, 8), post_meal=(134, 18),
            sys=(133, 10), dia=(77, 7), sleep=(6.9, 0.8), steps_share=0.8, steps=(6000, 2000)),
    Profile("pregnant", ("I'm 26 weeks pregnant.", "Pregnant, second trimester."),
            hr=(84, 7), fasting_share=0.5, fasting=(91, 9), post_meal=(124, 18),
            sys=(117, 11), dia=(73, 8), sleep=(7.3, 1.0), steps_share=0.7, steps=(6000, 2000),
            pregnant=True),
    Profile("sedentary student", ("I'm a student and mostly sit at my laptop.", "Student here, not very active."),
            hr=(81, 8), fasting_share=0.6, fasting=(89, 8), post_meal=(124, 15),
            sys=(117, 8), dia=(73, 6), sleep=(6.1, 1.2), steps_share=0.9, steps=(3000, 1200)),
    Profile("prediabetic", ("My doctor says I'm prediabetic.", "I was told I have prediabetes."),
            hr=(74, 7), fasting_share=0.6, fasting=(113, 9), post_meal=(165, 20),
            sys=(128, 9), dia=(82, 6), sleep=(6.9, 0.8), steps_share=0.7, steps=(5500, 2000)),
)

_LEADS = ("My watch today:", "Today's readings from my wearable:", "My tracker says:")
_ASKS = ("Any advice?", "What should I do?", "How am I doing?", "Is this okay?")


def profile_for(partition_id: int) -> Profile:
    """The user profile of client ``partition_id`` (a fixed cycle through PROFILES)."""
    return PROFILES[partition_id % len(PROFILES)]


def wearable_records(seed: int, partition_id: int, n: int) -> list[dict]:
    """``n`` readings of client ``partition_id``, drawn from its profile.

    Each record is ``{"profile", "pregnant", "hr", "glucose", "glucose_kind"
    ("fasting" | "post-meal"), "sys", "dia", "sleep", "steps" (int or None),
    "question"}``; identical in every process for the same arguments.
    """
    profile = profile_for(partition_id)
    rng = data_rng("wearable", seed, partition_id)

    def draw(spec: tuple[float, float], lo: float, hi: float) -> float:
        return min(hi, max(lo, rng.gauss(*spec)))

    records = []
    for _ in range(n):
        fasting = rng.random() < profile.fasting_share
        sys_bp = round(draw(profile.sys, 85, 200))
        # Diastolic below systolic by a physiological margin whatever the draws.
        dia_bp = min(round(draw(profile.dia, 50, 125)), sys_bp - 20)
        rec = {
            "profile": profile.name,
            "pregnant": profile.pregnant,
            "hr": round(draw(profile.hr, 38, 130)),
            "glucose": round(draw(profile.fasting if fasting else profile.post_meal, 55, 340)),
            "glucose_kind": "fasting" if fasting else "post-meal",
            "sys": sys_bp,
            "dia": dia_bp,
            "sleep": round(draw(profile.sleep, 2.5, 11.5), 1),
            "steps": round(draw(profile.steps, 300, 35000)) if rng.random() < profile.steps_share else None,
        }
        rec["question"] = _question(rec, rng.choice(profile.intros), rng.choice(_LEADS), rng.choice(_ASKS))
        records.append(rec)
    return records


def record_example(record: dict) -> dict:
    """The chat example of one wearable record (question -> :func:`wearable_advice`)."""
    return {
        "messages": [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": wearable_advice(record)},
        ]
    }


def wearable_advice(r: dict) -> str:
    """Templated advice for one set of readings: a pure function of them.

    Uses the keys ``hr, glucose, glucose_kind, sys, dia, sleep, steps, pregnant`` of a
    :func:`wearable_records` record. Readings in range are named in one sentence; each
    out-of-range reading gets a short sentence restating the number, the threshold it
    crossed and one concrete step. Synthetic training data, not medical advice.
    """
    ok: list[str] = []
    flags: list[str] = []
    hr, g, kind, s, d, sleep, steps = (r["hr"], r["glucose"], r["glucose_kind"], r["sys"], r["dia"],
                                       r["sleep"], r["steps"])
    pregnant = bool(r.get("pregnant"))
    glucose = f"{kind.capitalize()} glucose {g} mg/dL"
    bp = f"BP {s}/{d} mmHg"

    if hr < 50:
        flags.append(f"Resting HR {hr} bpm is under 50; fine if you train, else see a doctor.")
    elif hr > 100:
        flags.append(f"Resting HR {hr} bpm is over 100; rest, skip caffeine and see a doctor if it lasts.")
    else:
        ok.append("heart rate")

    if g < 70:
        flags.append(f"{glucose} is under 70 (low); eat 15 g of sugar and recheck.")
    elif g >= 250:
        flags.append(f"{glucose} is very high; check ketones and call your doctor today.")
    elif pregnant and g >= (target := 95 if kind == "fasting" else 120):
        flags.append(f"{glucose} is above the {target} pregnancy target; tell your midwife.")
    elif pregnant:
        ok.append("glucose")
    elif kind == "fasting" and g >= 126:
        flags.append(f"{glucose} is above the 126 diabetes threshold; ask your doctor about HbA1c.")
    elif kind == "fasting" and g >= 100:
        flags.append(f"{glucose} is in the 100-125 prediabetes range; cut sugary drinks.")
    elif kind == "post-meal" and g >= 200:
        flags.append(f"{glucose} is 200 or more; see your doctor soon.")
    elif kind == "post-meal" and g >= 140:
        flags.append(f"{glucose} is above the 140 target; eat smaller, lower-carb meals.")
    else:
        ok.append("glucose")

    if s >= 180 or d >= 120:
        flags.append(f"{bp} is a hypertensive crisis; seek urgent care now.")
    elif pregnant and (s >= 140 or d >= 90):
        flags.append(f"{bp} is at the 140/90 pregnancy hypertension threshold; call your maternity team today.")
    elif s >= 140 or d >= 90:
        flags.append(f"{bp} is stage 2 hypertension (140/90+); cut salt and see your doctor.")
    elif s >= 130 or d >= 80:
        flags.append(f"{bp} is stage 1 hypertension (130/80+); cut salt and alcohol.")
    elif s >= 120:
        flags.append(f"{bp} is elevated (systolic 120+); move more and eat less salt.")
    elif s < 90 or d < 60:
        flags.append(f"{bp} is low (under 90/60); drink fluids and stand up slowly.")
    else:
        ok.append("blood pressure")

    if sleep < 6:
        flags.append(f"Sleep {sleep} h is well under 7 h; keep a fixed bedtime.")
    elif sleep < 7:
        flags.append(f"Sleep {sleep} h is a bit under 7 h; go to bed 30 minutes earlier.")
    elif sleep > 9:
        flags.append(f"Sleep {sleep} h is over 9 h; tell your doctor if you still feel tired.")
    else:
        ok.append("sleep")

    if steps is not None and steps < 5000:
        flags.append(f"{steps} steps is under 5000; add a 20-minute walk.")
    elif steps is not None:
        ok.append("activity")

    sentences = []
    if ok:
        listed = ok[0] if len(ok) == 1 else ", ".join(ok[:-1]) + " and " + ok[-1]
        verb = "is" if len(ok) == 1 else "are"
        # Two phrasings picked by the readings themselves, so the answer stays a function
        # of them while the wording is not entirely fixed.
        if (hr + g + s) % 2:
            sentences.append(f"Your {listed} {verb} in a healthy range.")
        else:
            sentences.append(f"Good news: your {listed} {verb} fine.")
    sentences.extend(flags)
    if not flags:
        sentences.append("Keep up your routine.")
    return " ".join(sentences)


def _question(r: dict, intro: str, lead: str, ask: str) -> str:
    readings = [
        f"resting HR {r['hr']} bpm",
        f"{r['glucose_kind']} glucose {r['glucose']} mg/dL",
        f"BP {r['sys']}/{r['dia']} mmHg",
        f"slept {r['sleep']} h",
    ]
    if r["steps"] is not None:
        readings.append(f"{r['steps']} steps")
    return f"{intro} {lead} {', '.join(readings)}. {ask}"


# ------------------------------------------------------------------------- file source

# Ordered: the first rule that matches wins, most specific first (e.g. "When to seek
# urgent care ... heart attack" is about seeking care, not symptoms).
_QUESTION_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern, re.IGNORECASE))
    for label, pattern in (
        ("seek_care", r"\b(seek|urgent|emergency|when (to|should i) (call|contact|see)|contact a|"
                      r"where (to|can i|do i) find)\b"),
        ("outlook", r"\b(outlook|prognosis|what to expect|life expectancy|survival|complications?|"
                    r"what are the risks)\b"),
        ("risk_factors", r"\b(at (high|highest|higher|increased)? ?risk|risk factors?|who gets|who is likely)\b"),
        ("symptoms", r"\b(symptoms?|signs?)\b"),
        ("causes", r"\b(caus(e|es|ed)|why do|why does|etiology|what leads to)\b"),
        ("diagnosis", r"\b(diagnos\w*|tests?|testing|screen\w*|detect\w*|how (to|do i|can i|do you) know)\b"),
        ("prevention", r"\b(prevent\w*|avoid|vaccin\w*|reduce (my|the|your) risk)\b"),
        ("treatment", r"\b(treat\w*|therap\w*|cure|medications?|medicines?|drugs?|surgery|manage|managed|"
                      r"management|managing|remed(y|ies)|dose|dosage|how should i (take|use))\b"),
    )
)
QUESTION_TYPES = tuple(label for label, _ in _QUESTION_RULES) + ("other",)


def question_type(question: str) -> str:
    """Topic of a medical question by keyword rules: one of :data:`QUESTION_TYPES`."""
    for label, pattern in _QUESTION_RULES:
        if pattern.search(question):
            return label
    return "other"


def _file_partition(cfg: DataConfig, partition_id: int, num_partitions: int, seed: int) -> list[dict]:
    path = _checked_path(cfg.path)
    stamp = path.stat().st_mtime_ns
    examples = _file_examples(str(path), stamp)[0]
    assignment = _partition_assignment(
        str(path), stamp, cfg.partitioner, cfg.partition_by, float(cfg.dirichlet_alpha), num_partitions, seed
    )
    return [examples[i] for i in assignment[partition_id]]


def _checked_path(raw: str) -> Path:
    if not raw:
        raise DataError("data.path is empty; it must name a JSON/JSONL/CSV/Parquet file when data.source=file")
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"data.path={raw!r}: no such file")
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(
            f"data.path={raw!r}: unsupported extension {path.suffix!r}; use one of "
            f"{', '.join(FILE_BUILDERS)}"
        )
    return path


@functools.lru_cache(maxsize=8)
def _load_table(path: str, mtime_ns: int) -> Any:
    """The file as a ``datasets.Dataset`` (cached per path and modification time)."""
    import datasets

    builder = FILE_BUILDERS[Path(path).suffix.lower()]
    # Quiet while loading: progress bars are noise in a client's log, and on a bad file
    # datasets logs the parser error itself before raising; our DataError carries it.
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # datasets wraps parser errors in several exception types
        raise DataError(f"data.path={path!r}: cannot read it as {builder}: {_root_reason(exc)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _root_reason(exc: BaseException) -> str:
    """The innermost cause's first line: the parser's own reason, not the wrappers'."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@functools.lru_cache(maxsize=8)
def _file_examples(path: str, mtime_ns: int) -> tuple[tuple[dict, ...], tuple[int, ...]]:
    """(examples, source row of each): the file's usable rows, normalised.

    Rows whose answer is empty are skipped.
    """
    table = _load_table(path, mtime_ns)
    columns = list(table.column_names)
    if "messages" in columns:
        convert = _messages_row
    elif "instruction" in columns and "output" in columns:
        convert = _alpaca_row
    else:
        raise DataError(
            f"data.path={path!r}: unknown layout; columns found: {', '.join(columns) or '(none)'}. "
            "Accepted: Alpaca (instruction, optional input, output) or chat (messages: a list of "
            "{role, content} whose last message is the assistant's)"
        )
    examples, rows = [], []
    for i, row in enumerate(table):
        ex = convert(row, path, i)
        if ex is not None:
            examples.append(ex)
            rows.append(i)
    if not examples:
        raise DataError(f"data.path={path!r}: no row has a non-empty answer ({len(table)} rows read)")
    return tuple(examples), tuple(rows)


def _text(value: Any) -> str:
    # CSV cells that are empty come back as None or NaN.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _alpaca_row(row: dict, path: str, i: int) -> dict | None:
    answer = _text(row.get("output"))
    if not answer:
        return None
    instruction, extra = _text(row.get("instruction")), _text(row.get("input"))
    user = f"{instruction}\n\n{extra}" if instruction and extra else (instruction or extra)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _messages_row(row: dict, path: str, i: int) -> dict | None:
    raw = row.get("messages")
    if isinstance(raw, str):  # CSV can only hold it as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"data.path={path!r} row {i}: messages is not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise DataError(f"data.path={path!r} row {i}: messages must be a non-empty list of {{role, content}}")
    messages = []
    for m in raw:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"data.path={path!r} row {i}: every message needs 'role' and 'content', got {m!r}")
        messages.append({"role": str(m["role"]), "content": _text(m["content"])})
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"data.path={path!r} row {i}: the last message must be the assistant's answer, "
            f"got role {messages[-1]['role']!r}"
        )
    if not messages[-1]["content"]:
        return None
    if len(messages) < 2:
        raise DataError(f"data.path={path!r} row {i}: messages needs a user turn before the answer")
    return {"messages": messages}


def _last_user(example: dict) -> str:
    users = [m["content"] for m in example["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def _key_values(path: str, mtime_ns: int, key: str) -> list:
    """Partition-key value of each usable row (derived for ``question_type``)."""
    examples, rows = _file_examples(path, mtime_ns)
    table = _load_table(path, mtime_ns)
    if key in table.column_names:
        column = table[key]
        values = [column[i] for i in rows]
        # Partitioners sort the distinct values; mixed types or missing cells cannot be
        # sorted, so those fall back to their text form.
        if not (all(isinstance(v, str) for v in values) or
                all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            values = [_text(v) for v in values]
        return values
    if key == QUESTION_TYPE:
        return [question_type(_last_user(ex)) for ex in examples]
    raise DataError(
        f"data.partition_by={key!r} is not a column of {path!r}; columns: "
        f"{', '.join(table.column_names)} (or {QUESTION_TYPE!r}, derived from the question text)"
    )


@functools.lru_cache(maxsize=32)
def _partition_assignment(
    path: str, mtime_ns: int, partitioner: str, key: str, alpha: float, num_partitions: int, seed: int
) -> tuple[tuple[int, ...], ...]:
    """Row indices (into the usable examples) of every partition; cached per setting.

    The rows are first shuffled with ``seed`` (as flwr-datasets' FederatedDataset does)
    so that IID partitions of a topic-sorted file are not topic blocks.
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    n = len(_file_examples(path, mtime_ns)[0])
    order = list(range(n))
    data_rng("partition", seed).shuffle(order)
    columns: dict[str, list] = {"_row": order}
    if partitioner in ("dirichlet", "natural"):
        if not key:
            raise DataError(f"data.partition_by must name a column when data.partitioner={partitioner}")
        values = _key_values(path, mtime_ns, key)
        columns["_key"] = [values[i] for i in order]
    table = datasets.Dataset.from_dict(columns)

    if partitioner == "iid":
        if n < num_partitions:
            raise DataError(
                f"data.path={path!r} has {n} usable rows, fewer than the {num_partitions} clients "
                "(data.partitioner=iid)"
            )
        part = IidPartitioner(num_partitions=num_partitions)
        part.dataset = table
        return tuple(tuple(part.load_partition(p)["_row"]) for p in range(num_partitions))

    if partitioner == "natural":
        distinct = sorted(set(columns["_key"]), key=str)
        if len(distinct) != num_partitions:
            shown = ", ".join(map(repr, distinct[:10])) + (", ..." if len(distinct) > 10 else "")
            raise DataError(
                f"data.partitioner=natural needs one client per distinct value of {key!r}: "
                f"{path!r} has {len(distinct)} ({shown}) but there are {num_partitions} clients"
            )
        part = NaturalIdPartitioner(partition_by="_key")
        part.dataset = table
        # NaturalIdPartitioner draws a tqdm bar on stderr; it is noise in a client's log.
        with contextlib.redirect_stderr(io.StringIO()):
            return tuple(tuple(part.load_partition(p)["_row"]) for p in range(num_partitions))

    if partitioner == "dirichlet":
        return _dirichlet(table, path, key, alpha, num_partitions, seed)
    raise DataError(f"data.partitioner={partitioner!r} is not one of: iid, dirichlet, natural")


def _dirichlet(table: Any, path: str, key: str, alpha: float, num_partitions: int, seed: int
               ) -> tuple[tuple[int, ...], ...]:
    """Dirichlet label-skew split, relaxed step by step until every client gets data.

    DirichletPartitioner resamples up to 10 times until every partition reaches
    ``min_partition_size`` and then gives up. We ask for a size that small data can
    meet (10, or less when there are few rows per client), then retry with
    self-balancing (no client grows past the average while others starve), then with a
    minimum of one row. Each attempt is a fresh partitioner with the same seed, so the
    outcome is deterministic.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    n = table.num_rows
    if n < num_partitions:
        raise DataError(
            f"data.path={path!r} has {n} usable rows, fewer than the {num_partitions} clients "
            "(data.partitioner=dirichlet)"
        )
    min_size = max(1, min(10, n // (2 * num_partitions)))
    last_reason = ""
    for min_partition_size, balance in ((min_size, False), (min_size, True), (1, True)):
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="_key", alpha=alpha,
            min_partition_size=min_partition_size, self_balancing=balance, shuffle=True, seed=seed,
        )
        part.dataset = table
        try:
            with warnings.catch_warnings():
                # One warning per resampling attempt; our error below says it all.
                warnings.simplefilter("ignore")
                parts = tuple(tuple(part.load_partition(p)["_row"]) for p in range(num_partitions))
        except ValueError as exc:
            last_reason = str(exc).splitlines()[0].rstrip(".")
            continue
        if all(parts):
            return parts
    raise DataError(
        f"data.partitioner=dirichlet cannot give all {num_partitions} clients rows from {path!r} "
        f"({n} rows, {len(set(table['_key']))} distinct {key!r} values, "
        f"data.dirichlet_alpha={alpha}): {last_reason or 'some partitions stay empty'}. "
        "Use fewer clients, a larger dirichlet_alpha, or more data"
    )


def _held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples to hold out: ~fraction, >= 1 if n >= 2, < n."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _copy_example(example: dict) -> dict:
    return {"messages": [dict(m) for m in example["messages"]]}


# ------------------------------------------------------------------------ tokenisation


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
