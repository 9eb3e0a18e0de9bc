"""Everything MeZO refuses, in one place: what it cannot honour fails before any work, naming the fix.

MeZO replaces the Trainer's step with two perturbed forwards and no backward pass. Options that only
mean something for a backward pass (gradient clipping, gradient checkpointing, a gradient optimizer, a
GradScaler) would be silently ignored; setups that would make the two passes see different functions
of θ (training-mode noise, DataParallel replicas) or bypass the step would silently train something
else. Each is refused here with a `ValueError`/`TypeError` naming the option and the alternative, or,
where the behaviour is a legitimate choice that must not be silent (running statistics that stay
frozen), logged once.

Called from `MeZOMixin` (class definition and constructor), `ZerothOrderArguments.__post_init__` and
the model preparation (`distributed.wrap_model_for_mezo`). Imports nothing from hf_mezo, so that the
lowest module (the config) can use it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

# ---- the class: checked when it is defined -----------------------------------------------------------------------

# Trainers whose own `training_step` MeZO's replaces knowingly, and why that loses nothing.
BYPASSED_TRAINING_STEPS = {
    "SFTTrainer": "it only wraps the step in TRL's activation offloading, which matters for a backward pass only",
}

# TRL trainers whose compute_loss MeZO evaluates exactly (MeZOSFTTrainer re-scopes SFTTrainer's fused LM head).
VERIFIED_TRL_TRAINERS = {"_BaseTrainer", "BaseTrainer", "SFTTrainer"}


def shown_names(names: list[str], limit: int = 5) -> str:
    """`'a', 'b' and 3 more`: the names a warning or error quotes, at most `limit` of them."""
    return ", ".join(repr(n) for n in names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def refuse_misplaced_mixin(cls: type, mixin: type) -> None:
    """Refuse a class in which the mixin's step would not run, or would silently skip a subclass's step.

    `class Y(MyTrainer, MeZOMixin)` resolves `training_step`, `create_optimizer`, ... to the Trainer's: it
    would train by backprop with AdamW and ignore every zo_* setting. `class X(MeZOMixin, MyTrainer)` with a
    `MyTrainer.training_step` never calls it: MeZO's step replaces it.
    """
    mro = cls.__mro__
    if Trainer not in mro or mixin not in mro:
        return
    if mro.index(mixin) > mro.index(Trainer):
        bases = ", ".join([mixin.__name__] + [b.__name__ for b in cls.__bases__ if b is not mixin])
        raise TypeError(
            f"{cls.__name__}: {mixin.__name__} must come before the Trainer in the bases. As defined, Python resolves "
            f"training_step and create_optimizer to the Trainer's, so {cls.__name__} would train by backprop and "
            f"ignore every zo_* setting. Write `class {cls.__name__}({bases})`."
        )
    for base in mro[mro.index(mixin) + 1 :]:
        if base is Trainer or "training_step" not in vars(base) or base.__name__ in BYPASSED_TRAINING_STEPS:
            continue
        raise TypeError(
            f"{base.__name__}.training_step would never run in {cls.__name__}: {mixin.__name__} replaces the step "
            "(two perturbed forwards, no backward pass) and comes before it. Move what it does into compute_loss "
            f"(which both passes evaluate), or override training_step in {cls.__name__} itself and call "
            "super().training_step(...)."
        )


def refuse_unverified_trl_parents(cls: type) -> None:
    """Refuse a TRL trainer MeZO is not known to perturb exactly, before any work (by name: TRL is not imported)."""
    trl_parents = [c.__name__ for c in cls.__mro__ if c.__module__.split(".")[0] == "trl"]
    unverified = [name for name in trl_parents if name not in VERIFIED_TRL_TRAINERS]
    if unverified:
        raise TypeError(
            f"{cls.__name__} composes MeZOMixin with TRL's {unverified[0]}, which MeZO does not support: it is not "
            "verified that MeZO's two perturbed passes evaluate its loss exactly (TRL's preference/RL trainers use a "
            "fused float32 LM-head kernel, reference models or generation). Supported: "
            "hf_mezo.MeZOSFTTrainer (TRL's SFTTrainer), MeZOSeq2SeqTrainer, and your own transformers.Trainer "
            "subclasses via `class X(MeZOMixin, YourTrainer)`."
        )
    if "SFTTrainer" in trl_parents and not any(c.__name__ == "MeZOSFTTrainer" for c in cls.__mro__):
        raise TypeError(
            f"{cls.__name__} composes MeZOMixin with TRL's SFTTrainer directly; its fused LM head must be answered "
            "by the model's own forward for MeZO to be exact, which MeZOSFTTrainer does. Use hf_mezo.MeZOSFTTrainer, "
            "or `class X(MeZOSFTTrainer, YourSFTTrainer)` for your own subclass."
        )


# ---- the arguments -------------------------------------------------------------------------------------------------


def _field_default(args: TrainingArguments, name: str) -> Any:
    return type(args).__dataclass_fields__[name].default


def refuse_unsupported_options(args: TrainingArguments) -> None:
    """Raise a `ValueError` for a Trainer option that MeZO cannot honour, naming it and the alternative.

    Called by `MeZOTrainer` before any work (and by `MeZOConfig` when it is built). `max_grad_norm` is
    refused when it is set to something other than the arguments' own default: `MeZOConfig` defaults to
    0 (no clipping), but a plain `TrainingArguments` defaults to 1.0, which cannot be told apart from a
    deliberate 1.0, so that one is accepted and does nothing (MeZO has no gradient to clip).
    """
    if getattr(args, "neftune_noise_alpha", None) is not None:
        raise ValueError(
            f"neftune_noise_alpha={args.neftune_noise_alpha!r}: NEFTune adds noise to the input embeddings in training "
            "mode, but MeZO's two passes run in eval mode and must see the same function of θ (random noise would "
            "dominate L₊ − L₋). Unset neftune_noise_alpha."
        )
    optim = getattr(args, "optim", None)
    default_optim = _field_default(args, "optim")
    if optim is not None and str(getattr(optim, "value", optim)) != str(
        getattr(default_optim, "value", default_optim)
    ):
        raise ValueError(
            f"optim={getattr(optim, 'value', optim)!r}: MeZO's optimizer is hf_mezo.ZerothOrderSGD (no gradients, so no "
            "Adam/Adafactor/...). Leave `optim` at its default; learning_rate, weight_decay and the LR schedule are "
            "honoured, and a custom ZerothOrderSGD can be passed as MeZOTrainer(optimizers=(optimizer, None))."
        )
    adam = [
        n for n in ("adam_beta1", "adam_beta2", "adam_epsilon") if getattr(args, n, None) != _field_default(args, n)
    ]
    if adam:
        raise ValueError(
            f"{', '.join(f'{n}={getattr(args, n)!r}' for n in adam)}: these configure AdamW, which MeZO does not run (its optimizer is hf_mezo.ZerothOrderSGD, "
            "without moments). Leave them at their defaults; the zo_* fields configure MeZO's step."
        )
    if getattr(args, "optim_args", None) is not None:
        raise ValueError(
            f"optim_args={args.optim_args!r}: MeZO's ZerothOrderSGD takes no optimizer arguments from the Trainer. Unset "
            "optim_args and use the zo_* fields of MeZOConfig (zo_eps, zo_num_directions, ...)."
        )
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if max_grad_norm is not None and max_grad_norm > 0 and max_grad_norm != _field_default(args, "max_grad_norm"):
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r}: there is no gradient to clip in MeZO, and clipping the projected "
            "gradient g is not what max_grad_norm means (|g| is logged as grad_norm). Set max_grad_norm=0; to bound "
            "the step, lower learning_rate or zo_eps."
        )
    # transformers 5 renamed it activation_checkpointing (the old name stays as an alias until both are resolved).
    checkpointing = [n for n in ("activation_checkpointing", "gradient_checkpointing") if getattr(args, n, None)]
    if checkpointing:
        raise ValueError(
            f"{checkpointing[0]}=True trades compute for the activations a backward pass would keep, but MeZO runs "
            "no backward pass: its forwards keep no activations already, so the option would do nothing. "
            f"Unset {checkpointing[0]}."
        )


def refuse_data_parallel(args: TrainingArguments) -> None:
    """torch.nn.DataParallel copies its replicas before the perturbation runs: GPUs ≥ 1 would evaluate θ."""
    if args.n_gpu > 1:
        raise ValueError(
            f"n_gpu={args.n_gpu} would run MeZO under torch.nn.DataParallel (several GPUs, one process), whose "
            "replicas are copied before MeZO's perturbation runs, so GPUs ≥ 1 would evaluate θ instead of θ ± εz. "
            "Launch one process per GPU with `accelerate launch` (or torchrun), or expose one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )


def refuse_gradient_optimizers(trainer_name: str, kwargs: dict[str, Any], zeroth_order_cls: type) -> None:
    """An optimizer given to the Trainer must be a `ZerothOrderSGD` (`zeroth_order_cls`): MeZO computes no gradient."""
    optimizer = (kwargs.get("optimizers") or (None, None))[0]
    if optimizer is not None and not isinstance(optimizer, zeroth_order_cls):
        raise TypeError(
            f"{trainer_name} got optimizer {type(optimizer).__name__}, which needs gradients; MeZO computes none. "
            "Pass a hf_mezo.ZerothOrderSGD, or leave `optimizers` unset to get one from the config."
        )
    if kwargs.get("optimizer_cls_and_kwargs") is not None:
        cls = kwargs["optimizer_cls_and_kwargs"][0]
        if not (isinstance(cls, type) and issubclass(cls, zeroth_order_cls)):
            raise TypeError(
                f"{trainer_name} got optimizer_cls_and_kwargs with {cls!r}; only ZerothOrderSGD works without gradients."
            )


# ZerothOrderSGD's param-group keys → the settings they come from.
RESUMED_ZO_SETTINGS = {
    "seed": "zo_seed",  # or `seed` when zo_seed is unset
    "eps": "zo_eps",
    "num_directions": "zo_num_directions",
    "distribution": "zo_distribution",
    "stochastic_rounding": "zo_stochastic_rounding",
}


def refuse_changed_zo_settings_on_resume(configured: dict[str, Any], resumed: dict[str, Any], checkpoint: str) -> None:
    """Refuse a resume whose zo_* settings differ from the checkpoint's, which loading would silently override.

    The optimizer's state (`optimizer.pt`) carries the direction stream's seed, ε, n, distribution and
    rounding; loading it replaces what the arguments asked for, so a run "resumed with zo_seed=7" would
    keep drawing from the checkpoint's seed without a word.
    """
    changed = [key for key in RESUMED_ZO_SETTINGS if key in resumed and configured.get(key) != resumed[key]]
    if changed:
        details = "; ".join(
            f"{RESUMED_ZO_SETTINGS[k]}: {configured.get(k)!r} now, {resumed[k]!r} in the checkpoint" for k in changed
        )
        raise ValueError(
            f"Resuming from {checkpoint} with zeroth-order settings that differ from the ones it was trained with "
            f"({details}). The checkpoint's direction stream would silently continue with its own. Resume with the "
            "checkpoint's settings, or start a new run from its weights (load the model from the checkpoint "
            "without resume_from_checkpoint) to use the new ones."
        )


def refuse_uneven_last_batch(train_dataset, args: TrainingArguments, batch_size: int, num_processes: int) -> None:
    """Refuse a multi-process run whose last batch Accelerate would pad with rows from the start of the epoch.

    With `even_batches` (Accelerate's default) every process gets a full last batch, made up from the
    first rows of the epoch when the training set does not divide by the global batch; a P-process run
    then trains on other data than a 1-process run of the same global batch, and MeZO's equality of the
    two trajectories (docs/distributed.md) fails. `dataloader_drop_last=True` drops the same tail in both.
    A dataset without a length (streaming) cannot be checked.
    """
    if num_processes <= 1 or getattr(args, "dataloader_drop_last", False):
        return
    try:
        rows = len(train_dataset)
    except TypeError:
        return
    global_batch = batch_size * num_processes
    if rows % global_batch:
        tail = rows % global_batch
        raise ValueError(
            f"The training set has {rows} rows, not a multiple of the global batch {global_batch} ({batch_size} per "
            f"device × {num_processes} processes): Accelerate would fill the last batch of every epoch with rows "
            f"from its start, so this {num_processes}-process run would train on other data than a 1-process run of "
            f"the same global batch. Set dataloader_drop_last=True (which drops the last {tail} "
            f"row{'s' if tail > 1 else ''} of each epoch, on any number of processes), or give the training set a "
            f"multiple of {global_batch} rows."
        )


# ---- the model -----------------------------------------------------------------------------------------------------


def warn_frozen_running_statistics(model: nn.Module) -> None:
    """Log once which modules keep running statistics that MeZO's eval-mode passes never update.

    Both perturbed passes run in eval mode (they must see the same function of θ), so a BatchNorm's
    running mean/variance and `num_batches_tracked` keep their initial values, as in frozen-BatchNorm
    fine-tuning; the stock Trainer would update them at each training forward. Not an error: frozen
    statistics are a legitimate choice, but not one to make silently.
    """
    tracking = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and module.track_running_stats
        and module.running_mean is not None
    ]
    if tracking:
        shown = shown_names(tracking)
        logger.warning(
            f"MeZO does not update the running statistics of {shown}: its two passes run in eval mode, so running "
            "mean/variance stay at their current values (frozen BatchNorm), where the stock Trainer would update "
            "them at every training forward. To use batch statistics instead, build the norm with "
            "track_running_stats=False; to adapt the statistics, run forwards in train mode under torch.no_grad() "
            "before or after training."
        )


# ---- the distributed setup -----------------------------------------------------------------------------------------


def refuse_unsupported_accelerator(accelerator) -> None:
    """Refuse the distributed setups whose engines own the optimizer or the parameter layout in ways MeZO cannot use."""
    state = accelerator.state
    if accelerator.mixed_precision == "fp16":
        raise ValueError(
            "mixed_precision fp16 (from the accelerate config or ACCELERATE_MIXED_PRECISION) brings a GradScaler, which "
            "needs gradients; MeZO computes none. Use bf16, or load the model in float16/bfloat16 to train in half precision."
        )
    if getattr(state, "deepspeed_plugin", None) is not None:
        raise ValueError(
            "MeZOTrainer does not run under DeepSpeed: its engine expects gradients and owns the optimizer step. "
            "For a model too large for one GPU use FSDP2 (accelerate_configs/fsdp2*.yaml, fsdp_version: 2)."
        )
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "MeZOTrainer supports FSDP version 2 only (DTensor shards it can update in place); FSDP1's flat parameters "
            "hide each parameter's position. Set `fsdp_version: 2` in the accelerate config (or fsdp_config)."
        )
