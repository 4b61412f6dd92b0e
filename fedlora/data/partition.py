"""Splitting a dataset file across clients (iid, dirichlet, natural) and each client's held-out split.

Partitions come from flwr-datasets' partitioners over a seeded shuffle of the file's usable
rows; the partition key is a column of the file or the question type derived from its text.
Everything is deterministic given its arguments, in every process.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.errors import DataError
from fedlora.data.files import cell_text, checked_path, file_examples, load_table
from fedlora.seeds import data_rng

# Partition key derived from the question text when a file has no such column.
QUESTION_TYPE = "question_type"

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


def file_partition(cfg: DataConfig, partition_id: int, num_partitions: int, seed: int) -> list[dict]:
    """The usable examples of ``data.path`` that partition ``partition_id`` gets (shared, not copies)."""
    path = checked_path(cfg.path)
    stamp = path.stat().st_mtime_ns
    examples = file_examples(str(path), stamp)[0]
    assignment = _partition_assignment(
        str(path), stamp, cfg.partitioner, cfg.partition_by, float(cfg.dirichlet_alpha), num_partitions, seed
    )
    return [examples[i] for i in assignment[partition_id]]


def _last_user(example: dict) -> str:
    users = [m["content"] for m in example["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def _key_values(path: str, mtime_ns: int, key: str) -> list:
    """Partition-key value of each usable row (derived for ``question_type``)."""
    examples, rows = file_examples(path, mtime_ns)
    table = load_table(path, mtime_ns)
    if key in table.column_names:
        column = table[key]
        values = [column[i] for i in rows]
        # Partitioners sort the distinct values; mixed types or missing cells cannot be
        # sorted, so those fall back to their text form.
        if not (all(isinstance(v, str) for v in values) or
                all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            values = [cell_text(v) for v in values]
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
    # datasets and flwr_datasets take seconds to import: only when a file is partitioned
    import datasets
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    n = len(file_examples(path, mtime_ns)[0])
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
    from flwr_datasets.partitioner import DirichletPartitioner  # seconds to import: only for a Dirichlet split

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


def shuffled_held_out_split(rows: list[dict], fraction: float, seed: int, partition_id: int
                            ) -> tuple[list[dict], list[dict]]:
    """(train, held_out) copies of a client's ``rows``: a seeded shuffle, then ~``fraction`` held out."""
    order = list(range(len(rows)))
    data_rng("heldout", seed, partition_id).shuffle(order)
    n_eval = held_out_count(len(rows), fraction)
    held_out = [_copy_example(rows[i]) for i in order[:n_eval]]
    train = [_copy_example(rows[i]) for i in order[n_eval:]]
    return train, held_out


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples to hold out: ~fraction, >= 1 if n >= 2, < n."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _copy_example(example: dict) -> dict:
    return {"messages": [dict(m) for m in example["messages"]]}
