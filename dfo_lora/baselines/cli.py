"""`dfo-lora baseline METHOD ...`: the parser, the command and its summary.

Shared settings are tune's options of the same names (`--model`, `--task`, `--data-dir`,
`--k`, `--seed`, `--test-limit`, `--max-length`, `--dtype`, `--device`), or any TuneConfig
key in `--config FILE.yaml`, which may also hold a `baseline:` mapping of method ->
options (the same mapping as in a sweep file):

    task: sst2
    baseline:
      gradient-lora: {steps: 200, lr: 1.0e-3}
      icl: {demos_per_class: 2}

Method options are flags (`--lr 1e-3`), one flag per option name for all methods; a flag
that the chosen method does not take is an error. Command-line values override the file.
`--resume DIR` continues a killed run of a checkpointing method (mezo-lora, mezo) with
the settings it was started with (DIR's config.yaml and baseline.yaml), so no setting
may be given beside it.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from dfo_lora.baselines.registry import all_options, describe_methods, methods, options_by_method
from dfo_lora.config import TuneConfig, coerce, load_config, read_yaml_mapping
from dfo_lora.errors import UserError

METAVARS = {bool: "BOOL", int: "N", float: "X", list: "LIST", str: "NAME"}
SHARED = ("model", "task", "data_dir", "k", "seed", "test_limit", "max_length", "dtype", "device")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_baseline_parser(sub) -> None:
    parser = sub.add_parser(
        "baseline",
        help="a baseline (zero-shot, calibrated, icl, gradient-lora, gradient, subspace-gradient, mezo-lora, mezo, c-lora, f-lora)",
        description=(
            "Run a baseline on exactly tune's data, template, verbalizer, metric and dev "
            "selection; the output folder holds the same results.json keys as tune's."
        ),
        epilog="methods and their options:\n" + describe_methods(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "method",
        metavar="METHOD",
        nargs="?",
        help=", ".join(methods()) + " (optional with --resume)",
    )
    by_name = {f.name: f for f in fields(TuneConfig)}
    defaults = TuneConfig()
    shared = parser.add_argument_group("model and data (as in tune)")
    for name in SHARED:
        shared.add_argument(
            _flag(name),
            dest=name,
            default=None,
            help=f"{by_name[name].metadata['option'].help} (default: {getattr(defaults, name)})",
        )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="YAML: TuneConfig keys, and `baseline:` method -> options; flags override it",
    )
    run.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/<task>-<seed>-<method>)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the checkpointed run in DIR (mezo-lora, mezo) with its own settings",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("method options (each method takes those listed below)")
    for name, users in all_options().items():
        kinds = {type(opt.default) for _, opt in users}
        assert len(kinds) == 1, f"baseline option {name} has several types: {kinds}"
        takes = ", ".join(method for method, _ in users)
        kind = kinds.pop()
        extra = {"nargs": "?", "const": "true"} if kind is bool else {}
        group.add_argument(
            _flag(name),
            dest=f"option_{name}",
            default=None,
            metavar=METAVARS[kind],
            help=f"({takes})",
            **extra,
        )


def cmd_baseline(args) -> int:
    from dfo_lora.baselines.registry import get_method
    from dfo_lora.baselines.run import default_out, run_baseline

    if args.resume:
        return _resume(args)
    if args.method is None:
        raise UserError("baseline: name a METHOD (or --resume DIR)")
    method = get_method(args.method)
    values: dict = {}
    file_options: dict = {}
    if args.config:
        path = Path(args.config)
        data = read_yaml_mapping(path)
        file_options = options_by_method(data.pop("baseline", None), where=f"{path}: ")
        values = {k: coerce(k, v, where=f"{path}: ") for k, v in data.items()}
    values.update({name: getattr(args, name) for name in SHARED if getattr(args, name) is not None})
    config = load_config(None, values)
    options = dict(file_options.get(method.name, {}))
    for name in all_options():
        given = getattr(args, f"option_{name}")
        if given is not None:
            options[name] = given
    out = Path(args.out) if args.out else default_out(method.name, config)
    results = run_baseline(
        method.name, config, options, out, overwrite=args.overwrite, progress=not args.quiet
    )
    print(summary(results) + f"\nresults in {out}/results.json")
    return 0


def _resume(args) -> int:
    """`--resume DIR`: the run's own settings only; a flag that would change them is refused."""
    from dfo_lora.baselines.run import run_baseline

    out = Path(args.resume)
    if args.out and Path(args.out) != out:
        raise UserError("resume: --out and --resume name different folders")
    given = [name for name in SHARED if getattr(args, name) is not None]
    given += [name for name in all_options() if getattr(args, f"option_{name}") is not None]
    if args.config:
        given.insert(0, "config")
    if given or args.overwrite:
        flag = _flag(given[0]) if given else "--overwrite"
        raise UserError(f"resume: {flag} cannot be given; a run resumes with its own settings")
    results = run_baseline(args.method, None, None, out, progress=not args.quiet, resume=True)
    print(summary(results) + f"\nresults in {out}/results.json")
    return 0


def summary(results: dict) -> str:
    metric = results["metric"]

    def row(label: str, state: dict) -> str:
        return f"{label:20s}: dev {metric} {state['dev'][metric]:.4f}  test {metric} {state['test'][metric]:.4f}"

    detail = (
        f"{results['wall_time_s']:.0f} s, peak memory {results['peak_mem_bytes'] / 2**30:.2f} GiB"
    )
    if results.get("steps"):
        detail = f"best dev at step {results['best_dev_step']} of {results['steps']}, " + detail
    return "\n".join(
        [
            row("plain prompt", results["zero_shot"]),
            row("calibrated zero", results["calibrated_zero_shot"]),
            row(results["method"], results["tuned"]) + f"  ({detail})",
        ]
    )
