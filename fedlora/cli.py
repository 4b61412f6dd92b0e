"""The ``fedlora`` command.

    fedlora run [hydra overrides] [--multirun]   federated fine-tuning (Flower simulation)
    fedlora resume RUN_DIR                       continue an interrupted run
    fedlora status RUN_DIR [--follow] [--json]   run state, who joined which round, who dropped and why
    fedlora eval RUN_DIR|ADAPTER [overrides]     held-out loss and perplexity of an adapter (--adapter NAME=PATH: more)
    fedlora generate RUN_DIR|ADAPTER --prompt P  what the adapter answers (or a small chat; /adapter NAME switches)
    fedlora deploy plan OUT_DIR [overrides]      one folder per machine: TLS, node keys, start commands
    fedlora deploy check [--config NODE_FOLDER]  this device's facts and the training settings it can afford

  the tiers as real Flower processes, from a plan's folders (TLS, node auth, own keys; README "Deployment"):
    fedlora cloud --config FOLDER                cloud SuperLink + one federation over the edges (resumes)
    fedlora edge --config FOLDER                 an edge (neighbourhood) aggregator
    fedlora client --config FOLDER [--audit] [--cell X]  an END device: checks it, picks settings, starts its SuperNode
  or by hand on a trusted lab network (plain HTTP, keys from the seed):
    fedlora cloud --insecure --listen HOST:PORT [overrides]   (--plan: which END client under which edge)
    fedlora edge --insecure --cell C --parent HOST:PORT --listen HOST:PORT
    fedlora end --insecure --partition-id N --num-partitions M --edge HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedlora.usage import UserError

USAGE = __doc__


def _user_errors() -> tuple[type[BaseException], ...]:
    # only once an error reaches a handler: fedlora.roles.cloud, fedlora.model and fedlora.data import torch
    from fedlora.config import ConfigError
    from fedlora.data import DataError
    from fedlora.deploy.plan import PlanError
    from fedlora.deploy.processes import DeployError
    from fedlora.model import ModelError
    from fedlora.roles.cloud import FederationError
    from fedlora.runs.report import CheckpointError
    from fedlora.secure.identities import IdentityError

    return (UserError, ConfigError, DataError, ModelError, FederationError, DeployError, PlanError, IdentityError,
            CheckpointError)


def _setup_logging() -> None:
    # per command, as every import below: `fedlora --help` and `fedlora status` load no torch, Flower or Hydra
    from fedlora.runs.progress import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()


def cmd_run(argv: list[str]) -> None:
    """Hydra app: compose conf/ with the overrides, run the simulation in Hydra's output dir."""
    # Hydra only for `fedlora run`
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from fedlora.config import conf_dir, register_schema, to_typed

    register_schema()

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def job(raw: DictConfig) -> float | None:
        # the simulation (Flower, Ray) only once Hydra has composed this job's config
        from fedlora.runs.progress import quiet_libraries
        from server.simulation import simulate

        quiet_libraries()
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg = to_typed(raw)
            summary = simulate(cfg, run_dir)
        except _user_errors() as exc:
            print(f"fedlora: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"run directory: {run_dir}\n"
            f"  wall time {summary['wall_s']:.0f}s, {summary['total_bytes']['all'] / 1e6:.1f} MB exchanged\n"
            f"  sampled devices left out other than by dropping out: {summary.get('left_out_total', 0)} "
            f"of {summary.get('sampled_total', 0)} sampled\n"
            f"  next: fedlora eval {run_dir}   |   fedlora generate {run_dir} --compare-base --prompt '...'"
        )
        return summary.get("final_eval_loss")

    sys.argv = ["fedlora run", *argv]
    job()


def cmd_resume(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedlora resume", description="Continue an interrupted run from its last checkpoint.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    # the simulation (Flower, Ray) only for `fedlora resume`
    from fedlora.config import load_yaml
    from fedlora.runs import report
    from server.simulation import simulate

    if not (args.run_dir / "config.yaml").is_file():
        raise UserError(f"{args.run_dir} is not a run directory (no config.yaml)")
    cfg = load_yaml(args.run_dir / "config.yaml")
    checkpoint = report.load_checkpoint(args.run_dir)
    done = checkpoint[0] if checkpoint is not None else 0
    # Finished: its summary is written and its checkpoint holds every round its config asks for (a config
    # that asks for more rounds than are done resumes). Nothing is loaded and the run dir stays untouched.
    if (args.run_dir / report.SUMMARY).is_file() and done >= cfg.federation.rounds:
        print(f"fedlora: {args.run_dir} is finished: {done} of its {cfg.federation.rounds} rounds done "
              f"({report.SUMMARY} written); nothing to resume\n"
              f"  fedlora status {args.run_dir}   |   fedlora eval {args.run_dir}")
        return
    simulate(cfg, args.run_dir, resume=True)


# What `fedlora eval` and `fedlora generate` read of a config beside the adapter (dotted prefixes).
# Of model.* only how the base is loaded: which base it is comes with the run (or, for a bare
# adapter directory, from the overrides).
EVAL_READS = ("data", "seed", "federation.num_clients", "train.eval_batch_size", "train.max_seq_len", "model.dtype",
              "model.cache_dir")
GENERATE_READS = ("model.dtype", "model.cache_dir")


def _adapter_and_config(target: Path, overrides: list[str], command: str, reads: tuple[str, ...]):
    """(adapter dir, config) for a run directory or an adapter directory.

    The config is the run's (beside the adapter) with the overrides, else the composed config.
    An override that changes a setting ``command`` does not read from the config (LoRA from the
    adapter, the model from the run, the rest not at all) is a UserError naming it and why."""
    # Hydra/OmegaConf only for the commands that read a run (eval, generate)
    from omegaconf import OmegaConf

    from fedlora.config import ConfigError, compose, load_yaml, omegaconf_message, to_dict, to_typed

    adapter = target / "adapter" if (target / "adapter").is_dir() else target
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{target} is neither a run directory nor a PEFT adapter directory (no adapter_config.json)")
    run_config = adapter.parent / "config.yaml"
    if run_config.is_file():
        cfg = load_yaml(run_config)
        base = to_dict(cfg)
        if overrides:
            nodes = list(map(_override_node, overrides))
            try:
                merged = OmegaConf.merge(OmegaConf.create(base), *nodes)
            except Exception as exc:  # omegaconf raises several types; each is a bad override
                raise ConfigError(omegaconf_message(exc)) from None
            cfg = to_typed(merged)
    else:
        base, cfg = to_dict(compose([])), compose(overrides)
        reads = (*reads, "model")
    refused = [f"{o}: {why}" for o in overrides
               if (why := _why_not_read(o, base, adapter, run_config, command, reads)) is not None]
    if refused:
        applies = ", ".join(f"{r}.*" if r in ("data", "model") else r for r in reads)
        listed = refused[0] if len(refused) == 1 else "these overrides:" + "".join(f"\n  {r}" for r in refused)
        raise UserError(f"{command} cannot apply {listed}\n  (it applies overrides of {applies})")
    return adapter, cfg


def _why_not_read(override: str, base: dict, adapter: Path, run_config: Path, command: str, reads: tuple[str, ...]) -> str | None:
    """Why ``override`` cannot change what ``command`` does, or None when it can (or changes nothing)."""
    from omegaconf import OmegaConf  # Hydra/OmegaConf only for the commands that read a run (eval, generate)

    after = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), _override_node(override)))
    for path in _changed(base, after):  # type: ignore[arg-type]
        if any(path == r or path.startswith(f"{r}.") for r in reads):
            continue
        if path.startswith("lora."):
            lora = json.loads((adapter / "adapter_config.json").read_text())
            modules = lora.get("target_modules")
            modules = ",".join(sorted(modules)) if isinstance(modules, list) else modules
            return (f"the adapter fixes its LoRA settings (r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}, "
                    f"target_modules={modules} in {adapter / 'adapter_config.json'})")
        if path.startswith("model."):
            return (f"the run fixes the model (model.source={base['model']['source']} in {run_config}); "
                    "its adapter fits only that base")
        return f"{command} does not read {path}"
    return None


def _changed(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the settings whose value differs between two config dicts."""
    paths = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            paths += _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            paths.append(f"{prefix}{key}")
    return paths


def _override_node(item: str):
    """One override as a config to merge; a group selection like ``data=medical`` is that group file's keys."""
    # Hydra/OmegaConf only for the commands that read a run (eval, generate)
    from omegaconf import OmegaConf

    from fedlora.config import conf_dir

    key, _, value = item.partition("=")
    group_file = conf_dir() / key / f"{value}.yaml"
    if "." not in key and group_file.is_file():
        return OmegaConf.create({key: OmegaConf.to_container(OmegaConf.load(group_file))})
    if "." not in key and (conf_dir() / key).is_dir():
        known = ", ".join(sorted(f.stem for f in (conf_dir() / key).glob("*.yaml")))
        raise UserError(f"{item}: there is no {key} config {value!r} (conf/{key}/ has: {known})")
    return OmegaConf.from_dotlist([item])


def _adapter_set(adapter: Path, cfg, named: list[str], uses: list[str] | None):
    """The target's adapter (named ``global``) and every ``--adapter NAME=PATH`` over one base (loaded once),
    and the adapters to use in turn (``--use``; default each loaded one); UserError for a bad name or path."""
    # torch, transformers and peft only for the commands that load a model
    from fedlora.swap import AdapterSet, parse_named

    extra = parse_named(named)
    if "global" in extra:
        raise UserError("--adapter global=...: `global` is the name of the target's own adapter; pick another name")
    adapters = AdapterSet(cfg.model, {"global": adapter, **extra})
    specs = list(uses or adapters.names)
    for spec in specs:
        adapters.use(spec)  # UserError naming an unknown adapter, before any work
    adapters.use(specs[0])
    return adapters, specs


def _run_data(target: Path):
    """The data config the run behind ``target`` trained on (the composed default for a bare adapter directory)."""
    from fedlora.config import compose, load_yaml  # Hydra/OmegaConf only for the commands that read a run

    adapter = target / "adapter" if (target / "adapter").is_dir() else target
    run_config = adapter.parent / "config.yaml"
    return (load_yaml(run_config, files=False) if run_config.is_file() else compose([])).data


def _eval_data(cfg, target: Path, overrides: list[str], client: int | None) -> tuple[list[dict], str]:
    """The examples `fedlora eval` scores and what they are: a dataset file it is given (``data.path`` other than
    the run's) whole -- or its first ``data.max_eval_examples`` when that is given too --, else the run's held-out
    examples (with ``--client N``: client N's own). ``data.path`` alone implies ``data.source=file``."""
    from fedlora.data import client_examples, eval_examples, whole_file_examples  # torch only for `fedlora eval`

    given = {o.partition("=")[0] for o in overrides}
    trained = _run_data(target)
    if "data.path" in given and cfg.data.source != "file":
        cfg.data.source = "file"
    if cfg.data.source == "file" and (trained.source != "file" or cfg.data.path != trained.path):
        if client is not None:
            raise UserError(f"--client {client} scores a client's held-out part of the run's data; "
                            f"data.path={cfg.data.path} is another file (leave out one or the other)")
        examples = whole_file_examples(cfg.data.path)
        if "data.max_eval_examples" in given and cfg.data.max_eval_examples < len(examples):
            cut = cfg.data.max_eval_examples
            return examples[:cut], (f"the first {cut} of the {len(examples)} usable rows of {cfg.data.path} "
                                    "(data.max_eval_examples)")
        return examples, f"all {len(examples)} usable rows of {cfg.data.path} (a file given for evaluation is scored whole)"
    n = cfg.federation.num_clients
    if client is None:
        return (eval_examples(cfg.data, n, cfg.seed),
                f"the run's held-out examples (data.eval_fraction={cfg.data.eval_fraction} of each of its {n} clients' "
                f"data, at most data.max_eval_examples={cfg.data.max_eval_examples})")
    if not 0 <= client < n:
        raise UserError(f"--client {client}: the run has clients 0..{n - 1}")
    return client_examples(cfg.data, client, n, cfg.seed)[1], f"client {client}'s own held-out examples"


_SWAP_HELP = dict(
    adapter=("NAME=PATH: one more adapter (a PEFT adapter or run directory) on the same base, loaded once; repeatable. "
             "The target's own adapter is named `global`"),
    use=("adapter to use: a NAME, or NAMEs joined by + to combine them (e.g. global+personal, a FedDPA pair); "
         "repeatable, each in turn (default: each loaded adapter)"),
)


TASKS = {
    "choice": "labelled rows (--file): question, optional context, options (default yes/no/maybe) and the gold "
              "answer or label; each option scored by its log-likelihood after the prompt",
    "exact": "chat/Alpaca examples: greedy answers, exact match with the reference",
    "advice": "the wearable data: greedy advice, exact match and the share of readings it judges as the advice "
              "rules do",
}


def cmd_eval(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedlora eval", description="Held-out loss and perplexity of an adapter "
                                     "(or of each of several over one base); with --task, task accuracy.")
    parser.add_argument("target", type=Path, help="run directory or PEFT adapter directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help=_SWAP_HELP["adapter"])
    parser.add_argument("--use", action="append", metavar="NAME[+NAME]", help=_SWAP_HELP["use"] + "; each is scored")
    parser.add_argument("--client", type=int, help="score on this client's own held-out data only (e.g. its personal "
                                                   "adapter)")
    parser.add_argument("--task", choices=sorted(TASKS), help="task accuracy instead of loss, base and each adapter: "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(TASKS.items())))
    parser.add_argument("--file", help="--task choice: the labelled JSON/JSONL/CSV/Parquet file (scored whole)")
    parser.add_argument("--limit", type=int, help="--task: score only the first N items")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=medical data.max_eval_examples=200")
    args = parser.parse_intermixed_args(argv)
    if (args.file or args.limit is not None) and not args.task:
        raise UserError("--file and --limit go with --task (choice, exact or advice)")
    if args.task == "choice" and not args.file:
        raise UserError("--task choice needs --file LABELLED_FILE (rows with question, label/answer, optional options)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be >= 1")
    adapter, cfg = _adapter_and_config(args.target, args.overrides, "fedlora eval", EVAL_READS)
    if args.task == "choice":
        examples, scored = [], f"the labelled rows of {args.file}"
    else:
        examples, scored = _eval_data(cfg, args.target, args.overrides, args.client)
    adapters, specs = _adapter_set(adapter, cfg, args.adapter, args.use)
    result = _task_scores(args, cfg, adapters, specs, examples) if args.task else _loss_scores(cfg, adapters, specs, examples)
    result = {"adapter": str(adapter) if specs[0] == "global" else specs[0], "scored": scored, **result}
    if args.client is not None:
        result["client"] = args.client
    print(json.dumps(result, indent=2))


def _loss_scores(cfg, adapters, specs: list[str], examples: list[dict]) -> dict:
    """Held-out loss and perplexity of the base and of each adapter spec on ``examples``."""
    # torch only for `fedlora eval`
    from fedlora.data import tokenize
    from fedlora.runs.report import perplexity
    from fedlora.train import evaluate

    tokenizer = adapters.tokenizer
    held_out = tokenize(examples, tokenizer, cfg.train.max_seq_len)
    scores = {}
    for spec in specs:
        adapters.use(spec)
        scores[spec] = evaluate(adapters.model, held_out, cfg.train.eval_batch_size, pad_id=tokenizer.pad_token_id)
    with adapters.base_only():
        base_loss, _ = evaluate(adapters.model, held_out, cfg.train.eval_batch_size, pad_id=tokenizer.pad_token_id)
    loss, tokens = scores[specs[0]]
    result = {"examples": len(held_out), "answer_tokens": tokens, "base_eval_loss": base_loss, "eval_loss": loss,
              "base_perplexity": perplexity(base_loss), "perplexity": perplexity(loss)}
    if len(specs) > 1 or len(adapters.names) > 1:
        result["adapters"] = {spec: {"eval_loss": s[0], "perplexity": perplexity(s[0]),
                                     "paths": [str(adapters.paths[n]) for n in spec.split("+")]} for spec, s in scores.items()}
    return result


def _task_scores(args, cfg, adapters, specs: list[str], examples: list[dict]) -> dict:
    """``--task``: the base's and each adapter spec's accuracy (fedlora.tasks), the first adapter's at the top."""
    # torch and the task scorers only for `fedlora eval --task`
    from fedlora.data import file_rows
    from fedlora.data.wearable import advice_fields
    from fedlora.tasks import CHOICE_METHOD, answer_scores, choice_items, choice_scores, option_logprobs

    tokenizer, batch = adapters.tokenizer, cfg.train.eval_batch_size
    if args.task == "choice":
        items = choice_items(file_rows(args.file))[: args.limit]
        method = CHOICE_METHOD

        def score() -> dict:
            lp = option_logprobs(adapters.model, tokenizer, items, max_seq_len=cfg.train.max_seq_len, batch_size=batch)
            return {k: v for k, v in choice_scores(items, lp).items() if k != "predicted"}
    else:
        items = examples[: args.limit]
        fields = advice_fields if args.task == "advice" else None
        method = "greedy answers; exact match (whitespace collapsed)" + (
            "; field_accuracy: share of the readings judged as the advice rules judge them (in range, or the rule's "
            "own sentence)" if fields else "")

        def score() -> dict:
            return answer_scores(adapters.model, tokenizer, items, batch_size=batch, fields=fields)
    scores = {}
    for spec in specs:
        adapters.use(spec)
        scores[spec] = score()
    with adapters.base_only():
        base = score()
    out = {"task": args.task, "method": method, "examples": len(items), "base": base, "tuned": scores[specs[0]]}
    if len(specs) > 1 or len(adapters.names) > 1:
        out["adapters"] = scores
    return out


def cmd_generate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedlora generate", description="Answer prompts with a fine-tuned adapter "
                                     "(or several, switched over one base: /adapter NAME in the chat).")
    parser.add_argument("target", type=Path, help="run directory or PEFT adapter directory")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); without one, an interactive chat")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--compare-base", action="store_true", help="also show the base model's answer")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help=_SWAP_HELP["adapter"])
    parser.add_argument("--use", action="append", metavar="NAME[+NAME]",
                        help=_SWAP_HELP["use"] + "; each answers every --prompt (the chat starts with the first)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=bfloat16 (before or after the options)")
    args = parser.parse_intermixed_args(argv)
    # torch only for `fedlora generate`
    import torch

    adapter, cfg = _adapter_and_config(args.target, args.overrides, "fedlora generate", GENERATE_READS)
    adapters, specs = _adapter_set(adapter, cfg, args.adapter, args.use)
    model, tokenizer = adapters.model, adapters.tokenizer

    def answer(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"### Instruction:\n{prompt}\n\n### Response:\n"
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def label() -> str:
        return "adapter" if len(adapters.names) == 1 else adapters.active

    def show(prompt: str, specs: list[str]) -> None:
        print(f"> {prompt}")
        for spec in specs:
            adapters.use(spec)
            print(f"[{label()}] {answer(prompt)}")
        if args.compare_base:
            with adapters.base_only():
                print(f"[base]    {answer(prompt)}")
        print()

    if args.prompt:
        for prompt in args.prompt:
            show(prompt, specs)
        return
    _chat(adapters, lambda prompt: show(prompt, [adapters.active]))


def _chat(adapters, show) -> None:
    """The interactive chat: a line is a prompt; ``/adapter NAME[+NAME]`` switches adapters (the base stays loaded),
    ``/adapters`` lists them; an empty line or Ctrl-D ends it."""
    print("fedlora chat: type a message; /adapter NAME switches adapter, /adapters lists them; empty line or Ctrl-D quits")
    print(adapters.describe())
    while True:
        try:
            prompt = input(f"you ({adapters.active})> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        if prompt == "/adapters":
            print(adapters.describe())
        elif prompt.startswith("/adapter"):
            try:
                adapters.use(prompt.removeprefix("/adapter").strip())
                print(f"using {adapters.active}")
            except UserError as exc:
                print(f"fedlora: {exc}")
        else:
            show(prompt)


def _tier_parser(prog: str, description: str, *, config_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, metavar="NODE_FOLDER",
                        help=f"{config_help} (TLS, node authentication and its own keys; the other options come from "
                             "its node.yaml)")
    parser.add_argument("--insecure", action="store_true",
                        help="without --config: plain HTTP, no node authentication, keys derived from the seed "
                             "(a trusted lab network only)")
    parser.add_argument("--work-dir", type=Path, help="FLWR_HOME, logs and spool of this node (default: the node folder "
                                                      "with --config, else runs/nodes/<name>)")
    return parser


def _by_hand(args, parser, *required: str) -> None:
    """Without --config: --insecure and the listed options are needed."""
    missing = [f"--{r.replace('_', '-')}" for r in required if getattr(args, r) is None]
    if not args.insecure:
        raise UserError(f"{parser.prog}: give --config NODE_FOLDER (a folder of `fedlora deploy plan`: TLS and node "
                        "authentication), or --insecure with the addresses on a trusted lab network")
    if missing:
        raise UserError(f"{parser.prog} --insecure needs {', '.join(missing)}")


def _node(folder: Path, role: str):
    # the plan reader only for the tiers started from a plan folder (--config)
    from fedlora.deploy.plan import PlanError, read_node

    try:
        return read_node(folder, role)
    except PlanError as exc:
        raise UserError(str(exc)) from None


def _address(value: str, option: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option}={value!r} is not HOST:PORT")
    return value


def cmd_cloud(argv: list[str]) -> None:
    parser = _tier_parser("fedlora cloud", "The cloud tier: a SuperLink for the edges' SuperNodes and one federation "
                                           "run over them (ends when the run ends).",
                          config_help="the cloud's folder of a deployment plan; resumes its run/ when unfinished")
    parser.add_argument("--listen", help="HOST:PORT the SuperLink listens on (the edges' --parent)")
    parser.add_argument("--run-dir", type=Path,
                        help="run directory (default <output_dir>/cloud-<time>; <folder>/run with --config)")
    parser.add_argument("--resume", action="store_true", help="continue --run-dir from its last checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="print the edge and END commands this configuration needs (which client under which edge), "
                             "then exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. topology=small6g federation.rounds=3")
    args = parser.parse_args(argv)
    # the deployment's modules only for `fedlora cloud`
    from fedlora.config import compose, load_yaml
    from fedlora.deploy.processes import Security, Stop, run_cloud
    from fedlora.runs import report

    node = None
    if args.config is not None:
        if args.overrides or args.listen or args.insecure:
            raise UserError("with --config the settings come from the plan folder; no --listen, --insecure or overrides")
        node = _node(args.config, "cloud")
        listen, security = str(node.doc["superlink"]["listen"]), Security.from_node(node)
        run_dir, work_dir = args.run_dir or node.path("run"), args.work_dir or node.folder
        # A restarted cloud continues its unfinished run from the last checkpoint.
        args.resume = args.resume or (report.load_checkpoint(run_dir) is not None and not (run_dir / "summary.json").is_file())
        if (run_dir / "summary.json").is_file():
            raise UserError(f"{run_dir} holds a finished run; move it away (or pass --run-dir) to start another")
        cfg = load_yaml(run_dir / "config.yaml") if args.resume else node.config()
    else:
        _by_hand(args, parser, "listen")
        listen, security = _address(args.listen, "--listen"), Security(insecure=True)
        if args.resume:
            if args.run_dir is None or not (args.run_dir / "config.yaml").is_file():
                raise UserError("--resume needs --run-dir of an earlier cloud run (with config.yaml)")
            cfg = load_yaml(args.run_dir / "config.yaml")
        else:
            cfg = compose(args.overrides)
        run_dir = args.run_dir or Path(cfg.output_dir) / time.strftime("cloud-%Y%m%d-%H%M%S")
        work_dir = args.work_dir or Path("runs/nodes/cloud")
    if args.plan:
        # the edge placement only for --plan
        from fedlora.deploy.processes import plan

        print(plan(cfg, listen, args.overrides))
        return
    if args.resume:
        print(f"fedlora: resuming {run_dir} from its last checkpoint", file=sys.stderr)
    try:
        code = run_cloud(cfg, run_dir, listen, work_dir, security, resume=args.resume,
                         node_dir=node.folder if node else None)
    except Stop:
        again = f"fedlora cloud --config {node.folder}" if node else \
            f"fedlora cloud --resume --run-dir {run_dir} --listen {listen} --insecure"
        print(f"\nfedlora: interrupted; continue with: {again}", file=sys.stderr)
        raise SystemExit(130) from None
    if code != 0 or not (run_dir / "summary.json").is_file():
        raise UserError(f"the cloud run failed (exit code {code}); see {Path(work_dir) / 'logs'}")
    print(f"run directory: {run_dir}")


def cmd_edge(argv: list[str]) -> None:
    parser = _tier_parser("fedlora edge", "An edge (neighbourhood) aggregator: a SuperNode of its parent and the "
                                          "SuperLink of its END clients. Runs until stopped.",
                          config_help="the edge's folder of a deployment plan")
    parser.add_argument("--cell", help="the neighbourhood cell it aggregates, e.g. neighbourhood-0-1")
    parser.add_argument("--parent", help="HOST:PORT of the parent's SuperLink (the cloud's --listen)")
    parser.add_argument("--listen", help="HOST:PORT of this edge's SuperLink (its END clients' --edge)")
    args = parser.parse_args(argv)
    # the deployment's modules only for `fedlora edge`
    from fedlora.deploy.processes import Security, Stop, run_edge

    if args.config is not None:
        if args.insecure or args.cell or args.parent or args.listen:
            raise UserError("with --config the settings come from the plan folder; no --cell, --parent, --listen, --insecure")
        node = _node(args.config, "edge")
        doc = node.doc
        kwargs = dict(cell=str(doc["cell"]), parent=str(doc["supernode"]["superlink"]), listen=str(doc["superlink"]["listen"]),
                      work_dir=args.work_dir or node.folder, security=Security.from_node(node), node_dir=node.folder,
                      port=int(doc["supernode"]["runtime_port"]))
    else:
        _by_hand(args, parser, "cell", "parent", "listen")
        kwargs = dict(cell=args.cell, parent=_address(args.parent, "--parent"), listen=_address(args.listen, "--listen"),
                      work_dir=args.work_dir or Path(f"runs/nodes/edge-{args.cell}"), security=Security(insecure=True))
    try:
        run_edge(**kwargs)
    except Stop:
        pass


def cmd_end(argv: list[str], prog: str = "fedlora end") -> None:
    parser = _tier_parser(prog, "An END client: a SuperNode of its edge's SuperLink, training on its own data. "
                                "With --config (the device launcher) it first checks the device and picks the "
                                "training settings it can afford. Runs until stopped.",
                          config_help="the device's folder of a deployment plan")
    parser.add_argument("--partition-id", type=int, help="this client's id (its data partition)")
    parser.add_argument("--num-partitions", type=int, help="federation.num_clients of the run")
    parser.add_argument("--edge", help="HOST:PORT of its edge's SuperLink (the edge's --listen)")
    parser.add_argument("--audit", action="store_true",
                        help="keep a copy of every reply this device sends in <folder>/logs/sent/ (with --config)")
    parser.add_argument("--cold", action="store_true",
                        help="no resident device process: each Flower message's process loads the model itself "
                             "(Flower's default; slower; with --config)")
    parser.add_argument("--cell", help="with --config: attach to this candidate cell's edge (node.yaml candidate_cells; "
                                       "later moves: write a cell into <folder>/state/cell)")
    args = parser.parse_args(argv)
    # the deployment's modules only for `fedlora client`
    from fedlora.deploy.processes import Security, Stop, run_end

    try:
        if args.config is not None:
            if args.insecure or args.partition_id is not None or args.edge:
                raise UserError("with --config the settings come from the plan folder; no --partition-id, --edge, --insecure")
            # the launcher (device checks, plan reader) only for a planned device
            from fedlora.deploy.device import DeviceError
            from fedlora.deploy.launcher import launch
            from fedlora.deploy.plan import PlanError

            try:
                launch(args.config, audit=args.audit, warm=not args.cold, cell=args.cell)
            except (DeviceError, PlanError) as exc:
                raise UserError(str(exc)) from None
            return
        if args.cell:
            raise UserError("--cell chooses among a planned device's candidate cells: use it with --config")
        _by_hand(args, parser, "partition_id", "num_partitions", "edge")
        if not 0 <= args.partition_id < args.num_partitions:
            raise UserError(f"--partition-id={args.partition_id} must be in 0..--num-partitions-1 ({args.num_partitions - 1})")
        run_end(args.partition_id, args.num_partitions, _address(args.edge, "--edge"),
                args.work_dir or Path(f"runs/nodes/end-{args.partition_id}"), Security(insecure=True))
    except Stop:
        pass


def cmd_client(argv: list[str]) -> None:
    """``fedlora client``: the device launcher (= ``fedlora end``; on a device: ``--config FOLDER``)."""
    cmd_end(argv, "fedlora client")


def cmd_status(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedlora status", description="State of a run (running, finished, interrupted), "
                                     "rounds done, who joined and who dropped each round and why, per neighbourhood cell.")
    parser.add_argument("run_dir", type=Path, help="the run directory (of fedlora run, flwr run or fedlora cloud)")
    parser.add_argument("--follow", action="store_true", help="show it again every --interval seconds until the run finishes")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between looks with --follow (default 5)")
    parser.add_argument("--json", action="store_true", help="machine-readable status (with --follow: one JSON line per change)")
    parser.add_argument("--round", type=int, help="the round shown by cell (default the latest)")
    args = parser.parse_args(argv)
    # the run reader only for `fedlora status`
    from fedlora.runs.status import FINISHED, StatusError, render_text, run_status

    terminal = sys.stdout.isatty()
    shown = None
    try:
        while True:
            try:
                status = run_status(args.run_dir)
                text = json.dumps(status, indent=None if args.follow else 2) if args.json else render_text(status, args.round)
            except StatusError as exc:
                raise UserError(str(exc)) from None
            changed = (status["state"], status["rounds_done"])
            if not args.follow or changed != shown or (terminal and not args.json):
                if args.follow and terminal and not args.json:
                    print("\033[H\033[2J", end="")  # redraw in place on a terminal; a pipe gets one copy per change
                print(text, end="" if text.endswith("\n") else "\n", flush=True)
                shown = changed
            if not args.follow or status["state"] == FINISHED:
                return
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:  # `fedlora status ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_deploy(argv: list[str]) -> None:
    # `fedlora deploy`'s modules (cryptography, the planner) only for that command
    from fedlora.deploy.cli import main as deploy_main

    deploy_main(argv)


COMMANDS = {"run": cmd_run, "resume": cmd_resume, "status": cmd_status, "eval": cmd_eval, "generate": cmd_generate,
            "deploy": cmd_deploy, "cloud": cmd_cloud, "edge": cmd_edge, "end": cmd_end, "client": cmd_client}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fedlora: unknown command {command!r}; one of: {', '.join(COMMANDS)}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    _setup_logging()
    try:
        COMMANDS[command](rest)
    except _user_errors() as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\nfedlora: interrupted; continue with `fedlora resume <run dir>`", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
