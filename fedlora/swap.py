"""Several adapters over one frozen base, switched without reloading it (PEFT multi-adapter).

A device holds the federation's adapter, its personal one, one per task or federation; an
:class:`AdapterSet` loads the base once (:func:`fedlora.model.load_base_model`), each adapter beside
it (``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the rest), and
:meth:`AdapterSet.use` makes one of them -- or several at once, ``"global+personal"``, whose
contributions add up (FedDPA's global + personal pair) -- the active one. ``fedlora generate`` (and
its chat's ``/adapter NAME``) and ``fedlora eval`` use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from peft import PeftModel

from fedlora.config import ModelConfig
from fedlora.model import adapters_off, load_base_model
from fedlora.usage import UserError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter directory ``path`` names: itself, or a run directory's ``adapter/``; UserError otherwise."""
    path = Path(path)
    found = path / "adapter" if (path / "adapter").is_dir() else path
    if not (found / "adapter_config.json").is_file():
        raise UserError(f"{path} is neither a run directory nor a PEFT adapter directory (no adapter_config.json)")
    return found


def parse_named(items: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` items (``--adapter``) -> {name: adapter directory}; UserError for a bad or repeated name."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or not _NAME.match(name):
            raise UserError(f"--adapter {item!r}: give NAME=PATH (NAME of letters, digits, _ or -; PATH an adapter "
                            "or run directory)")
        if name in out:
            raise UserError(f"--adapter {name!r} given twice")
        out[name] = adapter_dir(path)
    return out


class AdapterSet:
    """Named adapters on one base model; :meth:`use` switches between them (or combines several)."""

    def __init__(self, model_cfg: ModelConfig, named: Mapping[str, Path]):
        """Load the base once and every adapter of ``named`` ({name: adapter directory}, at least one) beside it."""
        if not named:
            raise UserError("no adapter to load")
        base, self.tokenizer = load_base_model(model_cfg)
        items = list(named.items())
        first, path = items[0]
        self.model = PeftModel.from_pretrained(base, str(path), adapter_name=first)
        for name, path in items[1:]:
            try:
                self.model.load_adapter(str(path), adapter_name=name)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise UserError(f"adapter {name}={path} does not fit the base model of {first}: {exc}") from None
        self.model.eval()
        self.paths = dict(named)
        self.active = first

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def use(self, spec: str) -> None:
        """Make ``spec`` active: one adapter's name, or names joined by ``+`` (all active, contributions added)."""
        names = [n.strip() for n in spec.split("+")]
        unknown = [n for n in names if n not in self.paths]
        if unknown or not names:
            raise UserError(f"no adapter {unknown[0] if unknown else spec!r}; loaded: {', '.join(self.names)} "
                            "(combine with +, e.g. global+personal)")
        self.model.base_model.set_adapter(names if len(names) > 1 else names[0])
        self.active = "+".join(names)

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """The plain base model (every adapter off) inside the block."""
        with adapters_off(self.model):
            yield

    def describe(self) -> str:
        """One line per adapter: its name, directory and LoRA shape, the active ones marked."""
        active = set(self.active.split("+"))
        lines = []
        for name, path in self.paths.items():
            cfg = json.loads((path / "adapter_config.json").read_text())
            lines.append(f"{'*' if name in active else ' '} {name}: {path} (r={cfg.get('r')})")
        return "\n".join(lines)
