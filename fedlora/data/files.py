"""Dataset files: a local JSON/JSONL/CSV/Parquet instruction dataset read as examples.

Two layouts are accepted: Alpaca (``instruction``, optional ``input``, ``output``) and
chat (``messages``: a list of ``{role, content}`` whose last message is the assistant's).
Reads are cached per path and modification time, so a changed file is read again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

from fedlora.data.errors import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ALPACA_FIELDS = ("instruction", "input", "output")


def checked_path(raw: str) -> Path:
    """``data.path`` resolved, once it names an existing file of a supported kind."""
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
def load_table(path: str, mtime_ns: int) -> Any:
    """The file as a ``datasets.Dataset`` (cached per path and modification time)."""
    import datasets  # takes seconds to import: only when a dataset file is read

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
def file_examples(path: str, mtime_ns: int) -> tuple[tuple[dict, ...], tuple[int, ...]]:
    """(examples, source row of each): the file's usable rows, normalised.

    Rows whose answer is empty are skipped.
    """
    table = load_table(path, mtime_ns)
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


def cell_text(value: Any) -> str:
    """A cell's stripped text; "" for an empty cell."""
    # CSV cells that are empty come back as None or NaN.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _alpaca_row(row: dict, path: str, i: int) -> dict | None:
    answer = cell_text(row.get("output"))
    if not answer:
        return None
    instruction, extra = cell_text(row.get("instruction")), cell_text(row.get("input"))
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
        messages.append({"role": str(m["role"]), "content": cell_text(m["content"])})
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
