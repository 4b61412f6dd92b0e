"""bench/quality.py's own logic: recipes, the equal-steps rule, the fraction of the centralised gain and its table."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
# A bench script that cannot be imported is a broken benchmark: an error here, never a skip.
import quality  # noqa: E402 (importable only once bench/ is on sys.path)


def _args(**kw):
    base = dict(model="tiny", topology="flat", eval_examples=16, clients=4, rounds=2, local_steps=2, batch=4,
                max_seq_len=64, lr=2e-3, threads=1, overrides=[])
    return argparse.Namespace(**{**base, **kw})


def test_parse_recipe():
    assert quality.parse_recipe("fedavg") == quality.Recipe("fedavg", ())
    assert quality.parse_recipe("m:strategy=fedavgm  federation.rounds=4") == quality.Recipe(
        "m", ("strategy=fedavgm", "federation.rounds=4"))
    for bad in (":strategy=fedavgm", "m:fedavgm"):
        with pytest.raises(ValueError, match="LABEL"):
            quality.parse_recipe(bad)


def test_a_recipe_must_spend_the_benchs_steps_and_tokens(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    args = _args()
    base, _ = quality.compose_all_available(quality.overrides(args, str(data)))
    cfg, used = quality.recipe_config(args, str(data), quality.parse_recipe("R4:federation.rounds=4 train.local_steps=1"),
                                      "secure", base)
    assert (cfg.federation.rounds, cfg.train.local_steps, cfg.privacy.mode) == (4, 1, "secagg") and "privacy=secagg" in used
    for bad in ("more:federation.rounds=3", "longer:train.max_seq_len=128", "bigger:train.batch_size=8"):
        with pytest.raises(SystemExit, match="same steps and tokens"):
            quality.recipe_config(args, str(data), quality.parse_recipe(bad), "plain", base)


def test_fraction_of_the_centralised_gain_in_every_row():
    res = {"base": {"eval_loss": 3.0}, "central": {"eval_loss": 2.5, "seconds": 1.0},
           "local": {"eval_loss": 2.8, "seconds": 1.0}}
    assert quality.fraction(res, 2.55) == pytest.approx(0.9)
    assert math.isnan(quality.fraction({"base": {"eval_loss": 3.0}}, 2.0))
    rec = {"recipe": "fedavgm", "privacy": "secure", "rounds": 2, "local_steps": 2, "strategy": "fedavgm", "steps": 16,
           "eval_loss": 2.55, "fraction": 0.9, "seconds": 2.0}
    text = quality.quality_table({"results": res, "federated": [rec]}, 4, 2, 2)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert "0.4000" in rows["(c) local only 4 steps each (mean of 4)"]  # local-only's fraction: 0.2 / 0.5
    assert "secure" in rows["(a) fedavgm (2 rounds x 4 x 2 steps, fedavgm)"] and "0.9000" in rows[
        "(a) fedavgm (2 rounds x 4 x 2 steps, fedavgm)"]
