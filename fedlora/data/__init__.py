"""Each client's private instruction examples, and turning them into training batches.

An *example* is ``{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}`` (an optional leading ``system`` message and
earlier turns allowed); the LAST message is the assistant answer the loss is on.

Two sources (``DataConfig.source``):

* ``wearable`` (default, no download): every client generates its own health-tracker
  records from ``(seed, partition_id)``. A client's id picks a user profile (athlete,
  type-2 diabetic, ...) that shifts its readings, so clients are non-IID; the answer is
  a deterministic, templated function of the readings
  (:func:`~fedlora.data.wearable.wearable_advice`), so a small model can learn it within
  a few dozen LoRA steps.
* ``file``: a local JSON/JSONL/CSV/Parquet instruction dataset (Alpaca or chat
  ``messages`` layout) split across clients with flwr-datasets partitioners.

Everything is deterministic given its arguments, in every process: randomness comes
from :class:`random.Random` seeded with strings (:func:`fedlora.seeds.data_rng`; never ``hash()``, which Python
randomises per process) and from the partitioners' own seeded generators.

One module per concern: :mod:`~fedlora.data.wearable` (the synthetic source and its advice
rules), :mod:`~fedlora.data.files` (reading dataset files), :mod:`~fedlora.data.partition`
(splitting a file across clients; held-out splits), :mod:`~fedlora.data.tokens` (token ids
and batches) and :mod:`~fedlora.data.errors`. Callers use the names this package exports.
"""

from __future__ import annotations

from fedlora.config import DataConfig
from fedlora.data.errors import DataError
from fedlora.data.files import checked_path, file_examples, load_table
from fedlora.data.partition import file_partition, held_out_count, shuffled_held_out_split
from fedlora.data.tokens import batches, tokenize
from fedlora.data.wearable import record_example, wearable_records

__all__ = ["DataError", "batches", "client_examples", "eval_examples", "file_rows", "tokenize", "whole_file_examples"]


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
        n_eval = held_out_count(len(examples), cfg.eval_fraction)
        # Records are i.i.d. draws, so the first ones are as good a held-out set as any.
        return examples[n_eval:], examples[:n_eval]
    if cfg.source == "file":
        rows = file_partition(cfg, partition_id, num_partitions, seed)
        return shuffled_held_out_split(rows, cfg.eval_fraction, seed, partition_id)
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


def whole_file_examples(path: str) -> list[dict]:
    """Every usable example of the dataset file ``path``, in file order (what `fedlora eval` scores of a file it is
    given: none of it was trained on, so none is held back)."""
    where = checked_path(path)
    return list(file_examples(str(where), where.stat().st_mtime_ns)[0])


def file_rows(path: str) -> list[dict]:
    """The rows of a JSON/JSONL/CSV/Parquet file as dicts, in file order (labelled task data: its own columns)."""
    where = checked_path(path)
    return [dict(row) for row in load_table(str(where), where.stat().st_mtime_ns)]
