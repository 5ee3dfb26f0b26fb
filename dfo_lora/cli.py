"""`dfo-lora tune | eval | export | tasks | bench | sweep | baseline | plot`.

Every `tune` option is a TuneConfig field (see `dfo-lora tune --help`); `--config FILE`
loads YAML first and options given on the command line override it. Bad input prints
one line, `error: ...`, and exits with code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from dfo_lora.baselines.cli import add_baseline_parser, cmd_baseline
from dfo_lora.config import FIELD_TYPES, SPACE_OPTIONS, TuneConfig, load_config
from dfo_lora.errors import UserError

GROUPS = {
    "model and data": [
        "model",
        "task",
        "data_dir",
        "k",
        "seed",
        "test_limit",
        "max_length",
        "dtype",
        "device",
        "trust_remote_code",
    ],
    "search space": ["space", "intrinsic_dim", "class_dim", "alpha", "sigma", "loss", "calibrate"],
    # then one group per set of spaces reading an option (space_groups), then:
    "search": [
        "optimizer",
        "fwa_variant",
        "optimizer_options",
        "hybrid_mode",
        "popsize",
        "budget",
        "generations_per_visit",
        "subspace_dim",
        "layers",
        "layer_order",
        "commit",
        "select",
        "average_last",
        "fit_on",
        "z_penalty",
        "elitist",
        "eval_every",
        "checkpoint_every_s",
    ],
    "performance": ["max_tokens", "max_buckets", "prefix_cache", "compile", "cuda_graphs"],
    "distributed": ["backend", "address", "servers", "gpus_per_server", "cpus_per_server"],
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line with exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_groups() -> dict[str, list[str]]:
    """GROUPS with, after "search space", one group per set of spaces that read an option
    (from the spaces' declarations: a new space's options get their group by themselves)."""
    by_users: dict[str, list[str]] = {}
    for key, users in SPACE_OPTIONS.items():
        by_users.setdefault(f"{', '.join(users)} options", []).append(key)
    groups = {}
    for title, names in GROUPS.items():
        groups[title] = names
        if title == "search space":
            groups.update(by_users)
    return groups


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TuneConfig field, grouped, with the field's help and default."""
    by_name = {f.name: f for f in fields(TuneConfig)}
    defaults = TuneConfig()
    groups = config_groups()
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            option = by_name[name].metadata["option"]
            default = option.shown if option.shown is not None else getattr(defaults, name)
            if isinstance(default, list):
                default = ",".join(default)
            if isinstance(default, dict):
                default = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
            help_text = f"{option.help} (default: {default})"
            group.add_argument(
                _flag(name), dest=name, default=None, metavar=_metavar(name), help=help_text
            )
    missing = set(by_name) - {n for names in groups.values() for n in names}
    assert not missing, f"config fields without a CLI group: {missing}"


def _metavar(name: str) -> str:
    kind = FIELD_TYPES[name]
    text = getattr(kind, "__name__", str(kind)).upper()
    if kind is dict:
        return "K=V,..."
    return "LIST" if "list" in str(kind) else text.replace(" | NONE", "")


def optimizers_epilog() -> str:
    """The layer optimizers and the options each takes (--optimizer-options), from the registry."""
    from dfo_lora.optim import describe_optimizers

    return (
        "layer optimizers (--optimizer NAME, or fwa / hybrid with --fwa-variant NAME);\n"
        "--optimizer-options K=V,... takes the options listed:\n" + describe_optimizers()
    )


EXPORT_FORMATS = """\
formats by space:
  lora                        peft, merged or native
  hydra, series, parallel     native only (the change depends on each token's input:
                              no fixed weight delta to merge)
  bitfit                      native only (a bias shift: a bias-free model has no
                              bias to merge it into)
  prompt, deep-prompt         native only (prompt tokens go in front of the input)

  peft    a folder that PeftModel.from_pretrained(base, DIR) loads (LoRA, scaling 1;
          fused modules such as GPT-2's c_attn get B zero outside each target's slice)
  merged  the base model with the deltas added to its weights, loadable by
          AutoModelForCausalLM / AutoModelForMaskedLM.from_pretrained(DIR)
  native  the base model's reference (not its weights), the space, its config and the
          state's weights; dfo_lora.load_tuned(DIR) returns the HF model with the
          space's modules installed and the tuned weights in them

All in fp32; DIR must not exist."""


SWEEP_HELP = """\
A YAML file of runs: the product of the grid's lists, each with config's settings.

  out: runs/my-sweep        # one folder per run under it, and sweep.jsonl
  concurrency: 0            # runs at a time (0: as the cluster fits)
  grid:                     # any tune option (method = optimizer, or a baseline name)
    task: [sst2, trec]
    seed: [42, 13]
  config:                   # any tune option, for every run
    budget: 1200
    backend: local          # one run at a time in this process; default: ray

Runs go to Ray server actors (a running cluster, RAY_ADDRESS, or a new local one)
unless config says backend: local. A re-run skips finished runs and resumes
checkpointed ones with the same config. --only KEY=VALUES runs part of the grid into
the same folders (--only task=agnews --only seed=13,87)."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dfo-lora",
        description="Derivative-free optimization of LoRA (C-LoRA / F-LoRA), forward passes only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    tune = sub.add_parser(
        "tune",
        help="tune a model on a few-shot task",
        epilog=optimizers_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument(
        "--config", metavar="FILE", help="YAML config; command-line options override it"
    )
    tune.add_argument("--out", metavar="DIR", help="output folder (default: runs/<task>-<seed>)")
    tune.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(tune)

    ev = sub.add_parser("eval", help="score a finished run's tuned state on a split")
    ev.add_argument("run", metavar="RUN_DIR", help="output folder of `dfo-lora tune`")
    ev.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ev.add_argument("--zero-shot", action="store_true", help="score the unmodified model instead")
    ev.add_argument("--data-dir", default=None, help="override the run's data folder")
    ev.add_argument(
        "--test-limit",
        default=None,
        metavar="N|none",
        help="score a fixed subset of N test examples, or none: the whole split (default: "
        "the run's own test_limit, so the number is results.json's)",
    )
    ev.add_argument(
        "--model", default=None, help="the run's base model from elsewhere (it has moved)"
    )
    ev.add_argument(
        "--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's)"
    )
    ev.add_argument(
        "--dtype", default=None, help="auto | bf16 | bf16-mixed | fp16 | fp32 (default: the run's)"
    )

    export = sub.add_parser(
        "export",
        help="write a finished run's tuned state as a PEFT adapter, a merged model or the "
        "native format",
        description=EXPORT_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run", metavar="RUN_DIR", help="output folder of `dfo-lora tune`")
    export.add_argument(
        "--format", required=True, help="peft | merged (lora runs) | native (every space)"
    )
    export.add_argument(
        "--state", default="best", help="best (dev-selected, default) | final (last searched)"
    )
    export.add_argument("--out", required=True, metavar="DIR", help="a new folder")

    add_baseline_parser(sub)

    sweep = sub.add_parser(
        "sweep",
        help="a grid of runs on Ray server actors (see --help)",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="out, concurrency, grid, config")
    sweep.add_argument("--out", metavar="DIR", help="override the file's output folder")
    sweep.add_argument("--concurrency", type=int, help="runs at a time (0: as the cluster fits)")
    sweep.add_argument(
        "--only",
        action="append",
        metavar="KEY=VALUES",
        help="run only the runs with these grid values, as in their folder names "
        "(--only task=agnews --only seed=13,87); repeat for more axes",
    )

    plot = sub.add_parser(
        "plot", help="train loss and dev metric against evaluations, one row per task"
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run folders (their log.jsonl)")
    plot.add_argument(
        "--out",
        metavar="FILE",
        default="plot.png",
        help="png, pdf, svg or jpg, as the suffix says (default: plot.png)",
    )

    tasks = sub.add_parser("tasks", help="list tasks with templates, verbalizers and data source")
    tasks.add_argument("--json", action="store_true", help="one JSON object per task")

    bench = sub.add_parser("bench", help="server vs naive loop, FLOP/s, memory (same run)")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument("--task", default="sst2")
    bench.add_argument("--data-dir", default=None)
    bench.add_argument("--k", type=int, default=16)
    bench.add_argument("--seed", type=int, default=42)
    bench.add_argument("--popsize", type=int, default=20)
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--targets", default="q,k")
    bench.add_argument("--max-tokens", default="auto", help="tokens per chunk (default: auto)")
    bench.add_argument("--max-buckets", type=int, default=8, help="length buckets (default: 8)")
    bench.add_argument(
        "--compile", action="store_true", help="torch.compile the layers' norms and MLP"
    )
    bench.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="CUDA: replay the layers above the searched one from captured graphs",
    )
    bench.add_argument("--naive-per-layer", type=int, default=1, help="naive candidates per layer")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    synthetic = bench.add_argument_group(
        "synthetic (no weights, tokenizer or download: a real shape with random weights)"
    )
    synthetic.add_argument(
        "--synthetic",
        metavar="NAME",
        help="benchmark a shape instead of --model/--task: " + ", ".join(_synthetic_names()),
    )
    synthetic.add_argument("--examples", type=int, default=32, help="train examples N")
    synthetic.add_argument("--classes", type=int, default=2, help="classes C")
    synthetic.add_argument(
        "--median-tokens", type=int, default=14, help="median example length (log-normal)"
    )
    synthetic.add_argument(
        "--max-memory", type=float, metavar="GIB", help="refuse shapes needing more than this"
    )
    return parser


def _synthetic_names() -> list[str]:
    from dfo_lora.synthetic import SHAPES

    return list(SHAPES)


def cmd_tune(args) -> int:
    from dfo_lora.distributed import run_tune as tune  # the backend the config names

    overrides = {
        name: getattr(args, name) for name in FIELD_TYPES if getattr(args, name, None) is not None
    }
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise UserError("resume: --out and --resume name different folders")
        config = None
        if args.config or overrides:
            base = (
                load_config(run_dir / "config.yaml")
                if (run_dir / "config.yaml").is_file()
                else None
            )
            values = base.to_dict() if base else {}
            if args.config:
                from dfo_lora.config import read_yaml_mapping

                values.update(read_yaml_mapping(Path(args.config)))
            values.update(overrides)
            config = load_config(None, values)
        out = run_dir
        with resume_hint(out):
            results = tune(config, run_dir, resume=True, progress=not args.quiet)
    else:
        config = load_config(args.config, overrides)
        out = (
            Path(args.out) if args.out else Path("runs") / f"{Path(config.task).stem}-{config.seed}"
        )
        with resume_hint(out):
            results = tune(config, out, overwrite=args.overwrite, progress=not args.quiet)
    print(summary(results, out))
    return 0


class resume_hint:
    """On an interrupt (Ctrl-C, SIGTERM), say how to continue the run in `out`: a
    `--resume` if it checkpointed, else that nothing was saved."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from dfo_lora.search.run import CHECKPOINT

        if kind is not None and issubclass(kind, KeyboardInterrupt):
            if (self.out / CHECKPOINT).is_file():
                exc.args = (f"continue with: dfo-lora tune --resume {self.out}",)
            else:
                exc.args = (f"nothing checkpointed yet in {self.out}",)
        return False


def summary(results: dict, out: Path) -> str:
    """Plain prompt, calibrated zero state and tuned state: the floor and what tuning added."""
    metric = results["metric"]
    zs, tuned = results["zero_shot"], results["tuned"]
    calibrated = f"uncalibrated_{metric}" in zs["test"]  # --calibrate: zs is the calibrated state
    lines = []
    if calibrated:
        lines.append(
            f"plain prompt         : dev {metric} {zs['dev'][f'uncalibrated_{metric}']:.4f}"
            f"  test {metric} {zs['test'][f'uncalibrated_{metric}']:.4f}"
        )
    name = "calibrated zero state" if calibrated else "zero-shot (z = 0)    "
    lines.append(
        f"{name}: dev {metric} {zs['dev'][metric]:.4f}  test {metric} {zs['test'][metric]:.4f}"
    )
    select, evals = results.get("select"), results["evaluations"]
    if select == "average" or results.get("averaged"):
        which = f"the mean of the round-end states, {evals} evaluations"
        if select == "average_if_fit":
            which += ": the last state fitted train"
    elif select == "average_if_fit":
        fit = results["train_fit"][metric]
        which = (
            f"the last state, after {evals} evaluations: train {metric} {fit:.4f} < 1, not averaged"
        )
    elif select == "final":
        which = f"the last state, after {evals} evaluations"
    else:
        which = (
            f"best dev after {results['best_dev_evals']} of {results['evaluations']} evaluations"
        )
    lines.append(
        f"tuned                : dev {metric} {tuned['dev'][metric]:.4f}  test {metric} "
        f"{tuned['test'][metric]:.4f}  ({which}, {results['wall_time_s']:.0f} s)"
    )
    return "\n".join(lines) + f"\nresults in {out}/results.json"


EVAL_OVERRIDES = ("data_dir", "test_limit", "model", "device", "dtype")


def cmd_eval(args) -> int:
    """Score a run's tuned state (read back whole: `search.tuned.load_tuned`), with the
    run's settings except where the data, the base model, the device, the dtype or the
    test subset has been given again; these are coerced and validated as tune's are."""
    from dfo_lora.config import coerce
    from dfo_lora.search.tuned import load_tuned

    run_dir = Path(args.run)
    given = {
        name: getattr(args, name) for name in EVAL_OVERRIDES if getattr(args, name) is not None
    }
    if "test_limit" in given and args.split != "test":
        raise UserError(f"eval: --test-limit limits the test split, not --split {args.split}")
    values = {name: coerce(name, value) for name, value in given.items()}  # before loading
    z, config = load_tuned(run_dir)
    for name, value in values.items():
        setattr(config, name, value)
    config.validate()
    if "device" in values:  # an unknown or absent device fails before the data loads
        from dfo_lora.backbone.loading import resolve_device

        resolve_device(config.device)
    from dfo_lora.server.factory import build_server

    server = build_server(config.server_spec())
    if not args.zero_shot:
        server.set_state(z)
    metrics = server.evaluate(args.split)
    row = {"split": args.split, "zero_shot": args.zero_shot, **metrics}
    row["examples"] = int(server.split_sizes[args.split])
    if args.split == "test":
        row["test_limit"] = config.test_limit
    print(json.dumps(row, sort_keys=True))
    return 0


def cmd_export(args) -> int:
    from dfo_lora.export import export_run

    out = export_run(args.run, args.format, args.out, args.state)
    print(f"wrote {out} ({args.format}, {args.state} state)")
    return 0


def cmd_sweep(args) -> int:
    from dfo_lora.sweep import run_sweep

    summary = run_sweep(args.sweep_file, out=args.out, concurrency=args.concurrency, only=args.only)
    print(
        f"sweep: {summary['done']} done, {summary['skipped']} skipped, "
        f"{summary['failed']} failed; {summary['jsonl']}"
    )
    return 1 if summary["failed"] else 0


def cmd_plot(args) -> int:
    from dfo_lora.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def cmd_tasks(args) -> int:
    from dfo_lora.tasks import list_tasks

    for spec in list_tasks():
        row = {
            "name": spec.name,
            "labels": list(spec.label_names),
            "verbalizer": list(spec.verbalizer),
            "causal_verbalizer": list(spec.words(True)),
            "mlm_template": spec.mlm_template,
            "clm_template": spec.clm_template,
            "metric": spec.metric,
            "data": spec.description,
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{spec.name:14s} {spec.description}")
            print(f"  labels      : {', '.join(spec.label_names)}  (metric: {spec.metric})")
            print(f"  masked LM   : {spec.mlm_template!r} -> {', '.join(spec.verbalizer)}")
            print(f"  causal LM   : {spec.clm_template!r} -> {', '.join(spec.words(True))}")
    return 0


def cmd_bench(args) -> int:
    from dfo_lora.bench import format_report, run_bench

    if args.naive_per_layer < 1:
        raise UserError(f"--naive-per-layer must be at least 1, got {args.naive_per_layer}")
    values = {
        "model": args.model,
        "task": args.task,
        "data_dir": args.data_dir,
        "k": args.k,
        "seed": args.seed,
        "dtype": args.dtype,
        "device": args.device,
        "targets": args.targets,
        "max_tokens": args.max_tokens,
        "max_buckets": args.max_buckets,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "popsize": args.popsize,
        "budget": 10**9,  # unused by bench; keeps the round check quiet
        "test_limit": 1,  # bench scores train only
    }
    spec = load_config(None, values).server_spec()
    server, label = None, None
    if args.synthetic:
        from dfo_lora.synthetic import synthetic_server

        limit = None if args.max_memory is None else int(args.max_memory * 2**30)
        server = synthetic_server(
            args.synthetic, spec, args.examples, args.classes, args.median_tokens, limit
        )
        label = f"synthetic N={args.examples} C={args.classes} median {args.median_tokens} tokens"
    result = run_bench(
        spec,
        popsize=args.popsize,
        naive_per_layer=args.naive_per_layer,
        server=server,
        task_label=label,
    )
    print(json.dumps(result, sort_keys=True) if args.json else format_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "tune": cmd_tune,
        "eval": cmd_eval,
        "tasks": cmd_tasks,
        "bench": cmd_bench,
        "sweep": cmd_sweep,
        "plot": cmd_plot,
        "export": cmd_export,
        "baseline": cmd_baseline,
    }
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # as Ctrl-C
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system fault (read-only, full disk, a file as a folder)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # the run's lock and temp files are released on the way
        hint = f"; {exc.args[0]}" if exc.args else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so `finally` blocks (the run folder's lock)
    run as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
