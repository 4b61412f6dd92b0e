"""Who trains split, and where each split device's model is cut: the network model's choice.

``train.mode``: ``full`` (every device trains the whole model), ``split`` (every device trains
U-shaped with its neighbourhood edge), ``auto`` (split only the devices whose memory cannot hold
plain training). A split device's cut ``(k, m)`` is fixed by ``train.split.k``/``m`` or chosen
here per device: the cut with the fastest simulated optimiser step among those that fit the
device's memory (``memory_gb * train.split.usable_memory``) and keep ``k >= train.split.min_k``.

The estimates are a model, like the rest of the network model (illustrative, not measured):

- memory: the device's weights (embeddings, its blocks, the head) in ``model.dtype``, its LoRA
  tensors with their gradients and AdamW moments, the activations its blocks keep for the
  backward pass (one block's worth and each block's input under gradient checkpointing), one
  chunk of vocabulary logits, and ``train.split.runtime_mb`` for the interpreter and torch;
- step time: ``6 * parameters * tokens`` FLOPs per block at ``train.split.reference_gflops`` times
  the device's ``compute_speed`` (the edge's blocks at ``train.split.edge_speed`` shared by the
  cell's split devices), plus four activation-sized messages per micro-batch on the access link
  (its capacity shared by the cell's split devices, capped by the device's own rates, each with
  the hop's latency).

Pure Python: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedlora.config import DeviceProfileConfig, TrainConfig
from fedlora.world.topology import CellTree, Link

LOSS_CHUNK = 256  # fedlora.train.LOSS_CHUNK: answer positions whose logits exist at once
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class SplitCut:
    """Where one device's model is cut: the first ``k`` and the last ``m`` decoder blocks (with the
    embeddings, the final norm, the head and the loss) stay on the device; the edge runs the rest."""

    k: int
    m: int

    def edge_layers(self, num_layers: int) -> range:
        return range(self.k, num_layers - self.m)

    def on_edge(self, layer: int | None, num_layers: int) -> bool:
        """Whether block ``layer`` (None: not a decoder block) runs on the edge."""
        return layer is not None and layer in self.edge_layers(num_layers)


def tensor_layer(name: str) -> int | None:
    """The decoder block a (LoRA) tensor or parameter name belongs to, None outside the blocks."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def edge_keys(keys: Iterable[str], cut: SplitCut, num_layers: int) -> list[str]:
    """The keys (adapter tensor names) the edge trains for a device cut at ``cut``."""
    return [k for k in keys if cut.on_edge(tensor_layer(k), num_layers)]


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know of a Llama-style model."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool  # the head shares the embedding matrix
    weight_bytes: int  # bytes per base weight (model.dtype)
    lora_per_layer: int  # trainable LoRA parameters per decoder block
    lora_other: int = 0  # trainable LoRA parameters outside the blocks (embeddings, head)

    @property
    def block_params(self) -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h

    def activation_bytes(self, batch: int, seq: int) -> int:
        """One message of activations (or their gradient) at any cut: batch x seq x hidden."""
        return batch * seq * self.hidden * self.weight_bytes


@dataclass(frozen=True)
class SplitChoice:
    """How one device trains this round, and the estimates behind it."""

    cut: SplitCut | None  # None: the whole model (plain FL)
    memory_mb: float  # estimated peak training memory on the device
    step_s: float  # estimated seconds per optimiser step (split: device + edge + messages)
    fits: bool  # the estimate is within the device's usable memory

    def record(self) -> dict:
        cut = {} if self.cut is None else {"k": self.cut.k, "m": self.cut.m}
        return {"mode": "full" if self.cut is None else "split", **cut, "est_memory_mb": round(self.memory_mb, 1),
                "est_step_s": self.step_s, "fits": self.fits}


def device_memory_mb(shape: ModelShape, cut: SplitCut | None, train: TrainConfig) -> float:
    """Estimated peak training memory of a device holding the whole model (``cut`` None) or its ends."""
    blocks = shape.num_layers if cut is None else cut.k + cut.m
    embed = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    weights = (embed + blocks * shape.block_params + shape.hidden) * shape.weight_bytes
    lora = (blocks * shape.lora_per_layer + shape.lora_other) * 4 * 4  # weights, grads, AdamW m and v
    tokens, ab = train.batch_size * train.max_seq_len, shape.weight_bytes
    full_block = tokens * (14 * shape.hidden + 4 * shape.intermediate) * ab + \
        train.batch_size * shape.heads * train.max_seq_len ** 2 * ab
    if train.gradient_checkpointing:
        acts = blocks * tokens * shape.hidden * ab + (full_block if blocks else 0)
    else:
        acts = blocks * full_block
    acts += 2 * tokens * shape.hidden * ab + 3 * LOSS_CHUNK * shape.vocab * 4  # embeddings out, logits chunk
    return (weights + lora + acts) / 2**20 + train.split.runtime_mb


def _flop_s(train: TrainConfig, speed: float) -> float:
    return train.split.reference_gflops * 1e9 * speed


def step_seconds(shape: ModelShape, cut: SplitCut | None, train: TrainConfig, profile: DeviceProfileConfig,
                 access: Link, split_in_cell: int = 1) -> float:
    """Estimated seconds of one optimiser step (``train.grad_accum`` micro-batches)."""
    tokens = train.batch_size * train.max_seq_len
    block = 6 * shape.block_params * tokens
    head = 6 * shape.vocab * shape.hidden * tokens / 2  # roughly half the positions are answer tokens
    if cut is None:
        return train.grad_accum * (shape.num_layers * block + head) / _flop_s(train, profile.compute_speed)
    n = max(1, split_in_cell)
    device = ((cut.k + cut.m) * block + head) / _flop_s(train, profile.compute_speed)
    edge = (shape.num_layers - cut.k - cut.m) * block / _flop_s(train, train.split.edge_speed / n)
    msg_bits = shape.activation_bytes(train.batch_size, train.max_seq_len) * 8
    share = access.bandwidth_mbps * 1e6 / n if access.shared else access.bandwidth_mbps * 1e6
    latency = max(access.latency_ms, profile.latency_ms) / 1e3
    up = msg_bits / min(share, profile.uplink_mbps * 1e6) + latency
    down = msg_bits / min(share, profile.downlink_mbps * 1e6) + latency
    return train.grad_accum * (device + edge + 2 * (up + down))


def choose(shape: ModelShape, train: TrainConfig, profile: DeviceProfileConfig, access: Link, *,
           split: bool, split_in_cell: int = 1) -> SplitChoice:
    """This device's way to train: the whole model (``split`` False), or its cut -- the configured
    one, else the fastest estimated step among the cuts that fit its memory and the floor (the
    smallest-memory cut when none fits)."""
    budget = profile.memory_gb * 1024 * train.split.usable_memory
    if not split:
        mem = device_memory_mb(shape, None, train)
        return SplitChoice(None, mem, step_seconds(shape, None, train, profile, access), mem <= budget)
    sp = train.split
    ks = [sp.k] if sp.k > 0 else range(sp.min_k, shape.num_layers)
    options = []
    for k in ks:
        ms = [sp.m] if sp.m >= 0 else range(0, shape.num_layers - k)
        for m in ms:
            if k + m >= shape.num_layers:
                continue
            cut = SplitCut(k, m)
            mem = device_memory_mb(shape, cut, train)
            options.append(SplitChoice(cut, mem, step_seconds(shape, cut, train, profile, access, split_in_cell),
                                       mem <= budget))
    if not options:
        raise ValueError(f"no cut of a {shape.num_layers}-block model with train.split.k={sp.k}, m={sp.m}, "
                         f"min_k={sp.min_k} leaves a block for the edge")
    fitting = [o for o in options if o.fits]
    if fitting:
        return min(fitting, key=lambda o: (o.step_s, o.memory_mb, o.cut.k, o.cut.m))  # type: ignore[union-attr]
    return min(options, key=lambda o: (o.memory_mb, o.step_s))


def plan_round(tree: CellTree, cell_of: Mapping[int, str], clients: Sequence[int], shape: ModelShape,
               train: TrainConfig) -> dict[int, SplitChoice]:
    """Every client's way to train this round (``train.mode``); {} under ``full``.

    ``auto`` splits the clients whose plain training does not fit their memory; ``split`` all.
    A split device's edge is its neighbourhood (``cell_of``), shared with the cell's other split devices.
    """
    if train.mode == "full":
        return {}
    fits = {c: choose(shape, train, tree.profile(c), _access(tree, cell_of[c]), split=False) for c in clients}
    splitting = [c for c in clients if train.mode == "split" or not fits[c].fits]
    per_cell: dict[str, int] = {}
    for c in splitting:
        per_cell[tree.neighbourhood_of(cell_of[c])] = per_cell.get(tree.neighbourhood_of(cell_of[c]), 0) + 1
    out = dict(fits)
    for c in splitting:
        out[c] = choose(shape, train, tree.profile(c), _access(tree, cell_of[c]), split=True,
                        split_in_cell=per_cell[tree.neighbourhood_of(cell_of[c])])
    return out


def _access(tree: CellTree, leaf: str) -> Link:
    return tree.links[tree.first_hop(leaf)]
