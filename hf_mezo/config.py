"""`MeZOConfig`: the Trainer's arguments plus the zeroth-order knobs, defined once in `ZerothOrderArguments`.

The dataclass mixin `ZerothOrderArguments` holds the `zo_*` fields; any `TrainingArguments` subclass
composes with it (`MeZOSFTConfig` with TRL's `SFTConfig`, `MeZOSeq2SeqConfig`).

A `TrainingArguments` subclass in the TRL style: every field carries its help text, so the config
works unchanged with `HfArgumentParser` (`--zo_eps 1e-3 --zo_num_directions 2 ...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .methods import METHODS, resolve_method
from .objectives import OBJECTIVES
from .refusals import refuse_unsupported_options

ZO_DISTRIBUTIONS = ("gaussian", "rademacher")

# What a plain `TrainingArguments` gets when handed to `MeZOTrainer`: the paper's defaults.
ZO_DEFAULTS: dict[str, Any] = {
    "zo_method": "mezo",
    "zo_eps": 1e-3,
    "zo_num_directions": None,
    "zo_distribution": None,
    "zo_rank": None,
    "zo_refresh_interval": None,
    "zo_momentum": None,
    "zo_seed_log": False,
    "zo_seed": None,
    "zo_stochastic_rounding": True,
    "zo_train_top_layers": None,
    "zo_objective": None,
    "zo_float32_logits": True,
}


def validate_zo_settings(settings: dict[str, Any], *, fp16: bool = False) -> None:
    """Raise a `ValueError` naming the bad zeroth-order setting and its fix. Called before any work."""
    eps = settings["zo_eps"]
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(
            f"zo_eps must be a positive number (the perturbation scale ε), got {eps!r}; the paper uses 1e-3."
        )
    if settings["zo_method"] not in METHODS:
        raise ValueError(
            f"zo_method must be one of {sorted(METHODS)}, got {settings['zo_method']!r} "
            "(hf_mezo.methods.register_method adds one)."
        )
    n = settings["zo_num_directions"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"zo_num_directions must be None (the method's default) or an integer ≥ 1, got {n!r}.")
    distribution = settings["zo_distribution"]
    if distribution is not None and distribution not in ZO_DISTRIBUTIONS:
        raise ValueError(
            f"zo_distribution must be None (the method's default) or one of {ZO_DISTRIBUTIONS}, got {distribution!r}."
        )
    resolve_method(settings["zo_method"], **method_knobs(settings))  # the knobs must fit the method

    seed = settings["zo_seed"]
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"zo_seed must be a non-negative integer or None (use `seed`), got {seed!r}.")
    objective = settings["zo_objective"]
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(
            f"zo_objective must be None (the model's loss) or one of {sorted(OBJECTIVES)}, got {objective!r}; "
            "for another objective pass a callable to MeZOTrainer(objective=...)."
        )
    top = settings["zo_train_top_layers"]
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
        raise ValueError(f"zo_train_top_layers must be None (all layers) or an integer ≥ 0, got {top!r}.")
    if fp16:
        raise ValueError(
            "fp16=True (autocast + GradScaler) does not apply to MeZO: there is no backward pass, so the "
            "GradScaler has no gradients to unscale. Use bf16=True for autocast, or load the model with "
            "dtype=torch.float16 / torch.bfloat16 to train in half precision."
        )


def method_knobs(settings: dict[str, Any]) -> dict[str, Any]:
    """The method's knobs among the zo_* settings, by `ZerothOrderSGD`'s argument names (None: the method's)."""
    return {
        "num_directions": settings["zo_num_directions"],
        "distribution": settings["zo_distribution"],
        "rank": settings["zo_rank"],
        "refresh_interval": settings["zo_refresh_interval"],
        "momentum": settings["zo_momentum"],
    }


def zo_settings(args: TrainingArguments) -> dict[str, Any]:
    """The zeroth-order settings of `args`: its own `zo_*` fields, or the paper's defaults for plain args."""
    settings = {name: getattr(args, name, default) for name, default in ZO_DEFAULTS.items()}
    validate_zo_settings(settings, fp16=bool(getattr(args, "fp16", False)))
    return settings


@dataclass
class ZerothOrderArguments:
    """The `zo_*` fields, defined once: a dataclass mixin for any `TrainingArguments` subclass.

    Put it first, `@dataclass class X(ZerothOrderArguments, SomeArguments)` (`MeZOConfig`, `MeZOSFTConfig`,
    `MeZOSeq2SeqConfig`): the fields follow the parent's, `max_grad_norm` defaults to 0 (and `gradient_checkpointing` to unset), everything is
    validated before the parent's `__post_init__`, and `HfArgumentParser` sees them like any other field.

    One MeZO step draws a direction z from a seed, evaluates the loss at θ + εz and θ − εz,
    forms the projected gradient g = (L₊ − L₋) / 2ε and updates θ ← θ − lr·(g·z + wd·θ).
    `learning_rate`, `weight_decay`, the LR schedule and checkpointing are the Trainer's own.
    """

    zo_method: str = field(
        default="mezo",
        metadata={
            "help": "Zeroth-order method: 'mezo' (two-point estimate along full Gaussian z, SGD; the paper), 'fzoo' "
            "(4 one-sided Rademacher probes around one unperturbed loss, normalised by their loss spread), 'lozo' "
            "(low-rank directions s·U·Vᵀ per matrix, V kept 50 steps; with zo_momentum > 0: LOZO-M), 'zo_muon' "
            "(4 one-sided probes in an orthonormal rank-8 subspace per matrix re-drawn every 100 steps, "
            "orthogonalised update). See hf_mezo.methods and the README's methods section."
        },
    )
    zo_seed_log: bool = field(
        default=False,
        metadata={
            "help": "Record the run's seed log (per step the estimator's scalars and learning rates) and write "
            "seed_log.json into output_dir at every save and at the end: hf_mezo.replay_seed_log(base_model, path) "
            "reproduces the trained weights bit for bit, without the weights (see hf_mezo.seed_log)."
        },
    )
    zo_eps: float = field(
        default=1e-3,
        metadata={
            "help": "Perturbation scale ε of the two-point estimate. 1e-3 is the MeZO paper's value for full tuning."
        },
    )
    zo_num_directions: int | None = field(
        default=None,
        metadata={
            "help": "Probes (directions) per optimizer step; None: the method's default (mezo 1, fzoo 4, lozo 1, "
            "zo_muon 4). A two-point probe costs two forwards, a one-sided one one forward plus the shared "
            "unperturbed pass."
        },
    )
    zo_distribution: str | None = field(
        default=None,
        metadata={
            "help": "Distribution of full directions: 'gaussian' (N(0, I), as in the paper) or 'rademacher' (±1, cheaper "
            "to draw, same E[zzᵀ] = I). None: the method's default (fzoo: rademacher, others gaussian). For lozo / "
            "zo_muon it applies to the parameters that are not factored (biases, norms)."
        },
    )
    zo_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank r of factored directions (lozo: 2, zo_muon: 8 when None). Matrices with min(m, n) ≤ r get full directions."
        },
    )
    zo_refresh_interval: int | None = field(
        default=None,
        metadata={"help": "Steps a shared factor is kept (lozo: V, 50; zo_muon: the subspace, 100 when None)."},
    )
    zo_momentum: float | None = field(
        default=None,
        metadata={
            "help": "Momentum β on the small factor of factored methods (lozo → LOZO-M; zo_muon before "
            "orthogonalisation); state r·(m or n) numbers per matrix. None/0: no momentum. Refused for full "
            "directions (its buffer would be the model's size)."
        },
    )
    zo_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the direction stream (z depends on it, the step, the direction and the parameter's name). "
            "None uses `seed`. The global torch RNG is never touched."
        },
    )
    zo_stochastic_rounding: bool = field(
        default=True,
        metadata={
            "help": "For bf16/fp16 weights: round each update stochastically, so updates far below the weights' "
            "precision still move them in expectation instead of vanishing."
        },
    )
    zo_train_top_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train only the top K encoder layers and the LM head's dense/LayerNorm/bias (None: all "
            "parameters). The tied word-embedding/decoder matrix stays frozen (training it would change the input "
            "embeddings). Fewer perturbed parameters and a faster step: the prompt-MLM models (hf_mezo.models) cache "
            "the frozen bottom layers' output per example. Costs some accuracy against full tuning."
        },
    )

    zo_objective: str | None = field(
        default=None,
        metadata={
            "help": "Train on a built-in objective of hf_mezo.objectives instead of the model's loss: "
            "'negative_accuracy' or 'negative_f1' (no gradient needed; logged as the loss). None: the model's loss. "
            "A custom objective(model, inputs) callable goes to MeZOTrainer(objective=...)."
        },
    )
    zo_float32_logits: bool = field(
        default=True,
        metadata={
            "help": "Upcast the logits to float32 in the perturbed passes, so that a bf16/fp16 model's loss, and "
            "L₊ − L₋, are not rounded to the low precision's coarse grid (which zeroes many projected gradients)."
        },
    )

    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Must stay 0: MeZO computes no gradient to clip (the projected gradient |g| is logged as "
            "grad_norm). Any other value is refused rather than silently ignored."
        },
    )

    # TRL's configs default it to True; MeZO has no backward pass to checkpoint, so here it defaults to unset.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Must stay unset: activation checkpointing saves the activations of a backward pass, and MeZO runs "
            "none. True is refused rather than silently ignored."
        },
    )

    def __post_init__(self):
        # Validate before the parent builds devices and accelerator state: bad input fails fast.
        validate_zo_settings({name: getattr(self, name) for name in ZO_DEFAULTS}, fp16=self.fp16)
        refuse_unsupported_options(self)
        super().__post_init__()


@dataclass
class MeZOConfig(ZerothOrderArguments, TrainingArguments):
    """Arguments for `MeZOTrainer`: everything `TrainingArguments` has, plus the `zo_*` fields
    (`ZerothOrderArguments`)."""
