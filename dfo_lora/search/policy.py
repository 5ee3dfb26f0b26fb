"""Run-level search policy: which optimizers a run holds per layer, which one a visit uses
(hybrid alternation), which layers are searched and in what order, and how many rounds fit
the budget.

The config validates against these choices and the layer-wise loop follows them; both
import this module, and it imports neither (it reads the config's fields only), so there
is no config <-> loop import cycle. The layer optimizers themselves come from the one
registry in `dfo_lora/optim/registry.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.optim.registry import CMA_NAMES, FIREWORKS_NAMES, OPTIMIZERS

if TYPE_CHECKING:
    from dfo_lora.config import TuneConfig

HYBRID = "hybrid"
# `optimizer` of a run: every registered layer optimizer by name, plus the hybrid. At run
# level `fwa` is F-LoRA: the Fireworks variant `fwa_variant` (Tan & Zhu's FWA itself is
# `optimizer: fwa` with `fwa_variant: fwa`).
RUN_OPTIMIZERS: tuple[str, ...] = (*OPTIMIZERS, HYBRID)
FWA_VARIANTS: tuple[str, ...] = FIREWORKS_NAMES
LAYER_ORDERS = ("bottom_up", "top_down", "random")
COMMITS = ("best", "mean")
SELECTIONS = ("metric", "loss", "final", "average", "average_if_fit")
AVERAGING = ("average", "average_if_fit")  # the selections that keep the round-end states
WITHOUT_DEV = ("final", *AVERAGING)  # the selections that never look at dev
HYBRID_MODES = ("layer", "round")


def optimizer_help() -> str:
    """The `optimizer` option's help, from the registry."""
    special = {
        "cma": "cma (C-LoRA)",
        "fwa": "fwa (F-LoRA: the --fwa-variant)",
    }
    names = [special.get(name, name) for name in RUN_OPTIMIZERS]
    return " | ".join(names) + " (each one's options: the list below)"


def fwa_variant_help() -> str:
    return "Fireworks variant of fwa and hybrid: " + " | ".join(FWA_VARIANTS)


def optimizer_kinds(config: TuneConfig) -> list[str]:
    """Optimizer names each layer holds (hybrid: both kinds; `fwa` = the chosen variant)."""
    if config.optimizer == "fwa":
        return [config.fwa_variant]
    if config.optimizer != HYBRID:
        return [config.optimizer]
    return ["cma", config.fwa_variant]


def options_for(config: TuneConfig, kind: str) -> dict:
    """`optimizer_options` go to the configured optimizer; in a hybrid, to its Fireworks half."""
    if config.optimizer == HYBRID and kind in CMA_NAMES:
        return {}
    return dict(config.optimizer_options)


def check_commit(config: TuneConfig) -> None:
    """An optimizer that steps a point (esgrad) leaves the loop its mean to install: its
    best candidate, or an elitist visit's best, is a probe around that point."""
    for kind in optimizer_kinds(config):
        if OPTIMIZERS[kind].commits_best:
            continue
        if config.elitist:
            raise UserError(
                f"elitist: {kind} steps its mean; an elitist visit would commit a probe"
            )
        if config.commit != "mean":
            raise UserError(f"commit: {kind} steps its mean, so it needs commit: mean")


def optimizer_index(config: TuneConfig, layer: int, round_index: int) -> int:
    """Which of the layer's optimizers (`optimizer_kinds` order) runs this visit: the
    hybrid alternates CMA-ES and Fireworks over layers (`layer`) or rounds (`round`)."""
    if config.optimizer != HYBRID:
        return 0
    if config.hybrid_mode == "layer":
        return layer % 2
    return round_index % 2


def layer_order(config: TuneConfig, layers: Sequence[int], round_index: int) -> list[int]:
    """The round's order over the searched layers; `random` is seeded by (seed, round), so
    resume needs no RNG."""
    layers = [int(layer) for layer in layers]
    if config.layer_order == "bottom_up":
        return layers
    if config.layer_order == "top_down":
        return layers[::-1]
    rng = np.random.default_rng([config.seed, round_index])
    return [layers[i] for i in rng.permutation(len(layers))]


def evals_per_visit(config: TuneConfig) -> int:
    """Candidates scored in one layer visit (`elitist` adds the layer's current z)."""
    return config.popsize * config.generations_per_visit + int(config.elitist)


def rounds_for(config: TuneConfig, num_layers: int) -> int:
    per_round = num_layers * evals_per_visit(config)
    rounds = config.budget // per_round
    if rounds < 1:
        extra = " + 1 elitist" if config.elitist else ""
        raise UserError(
            f"budget: {config.budget} is smaller than one round ({num_layers} layers x (popsize "
            f"{config.popsize} x {config.generations_per_visit} generations{extra}) = "
            f"{per_round} evaluations)"
        )
    return rounds


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """The searched layers, ascending, from `all | top:N | bottom:N | 0,4,20-29`.

    With `num_layers=None` (the model is not loaded yet) only the syntax is checked, and
    `all`, `top:N` and `bottom:N` give [] since their layers are not known yet.
    """
    text = spec.strip().lower()
    try:
        side, _, count = text.partition(":")
        if text == "all":
            chosen = list(range(num_layers or 0))
        elif side in ("top", "bottom") and count:
            n = int(count)
            if n <= 0:
                raise ValueError
            if num_layers is None:
                chosen = []
            elif n > num_layers:
                raise UserError(f"layers: {spec!r} asks for {n} of the model's {num_layers} layers")
            else:
                chosen = list(range(num_layers - n, num_layers) if side == "top" else range(n))
        else:
            picked: set[int] = set()
            for part in text.split(","):
                first, _, last = part.strip().partition("-")
                lo, hi = int(first), int(last) if last else int(first)
                if lo < 0 or hi < lo:
                    raise ValueError
                picked.update(range(lo, hi + 1))
            chosen = sorted(picked)
    except ValueError:
        raise UserError(
            f"layers: {spec!r} is not all, top:N, bottom:N or a list such as 0,4,20-29"
        ) from None
    if num_layers is not None and chosen and chosen[-1] >= num_layers:
        raise UserError(
            f"layers: layer {chosen[-1]} does not exist (the model has layers 0-{num_layers - 1})"
        )
    return chosen
