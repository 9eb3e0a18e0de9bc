"""`MeZOMixin`: a zeroth-order `training_step` for any Hugging Face Trainer; `MeZOTrainer` = it + `Trainer`.

The mixin composes with any `Trainer` subclass, `class MyTrainer(MeZOMixin, SomeTrainer)`: whatever
`compute_loss` the subclass has (its own, `Seq2SeqTrainer`'s, TRL's `SFTTrainer`'s through
`MeZOSFTTrainer`) is what the two passes evaluate. Only the step changes. For each micro-batch the trainer evaluates `compute_loss` at θ + εz and at
θ − εz (dropout off, no autograd), adds g = (L₊ − L₋) / 2ε to the optimizer's running projected
gradient and returns (L₊ + L₋) / 2 as the training loss. The Trainer's loop then calls
`optimizer.step()` once per optimizer step, which regenerates z and applies the update. Data
loading, gradient accumulation, LR schedules, logging, evaluation, checkpointing, resuming and
callbacks are the Trainer's own.

Under gradient accumulation each micro-batch's mean loss is weighted by its share of the step's
labelled items (labels ≠ -100, counted the Trainer's way), so the step optimizes the mean over all
items of the step — for every model, including those that accept `num_items_in_batch` but ignore it.
Across processes the share is of the global count (`average_tokens_across_devices`), and the
projected gradients are mean-reduced: every rank then applies the same update.

The loss of the two passes is `compute_loss`, or an `objective(model, inputs)` given to the trainer
(`objective=` or `MeZOConfig.zo_objective`) that needs no gradient, e.g. negative accuracy
(`objectives`). Around the passes the logits are upcast to float32, so that bf16/fp16 models do not
round L₊ − L₋ to their coarse grid (`precision`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .config import method_knobs, refuse_unsupported_options, zo_settings
from .distributed import check_rank_consistency, wrap_model_for_mezo
from .models import freeze_all_but_top_layers
from .objectives import Objective, resolve_objective
from .optimizer import ZerothOrderSGD
from .perturbation import check_perturbable, perturbed
from .precision import float32_logits
from .shards import is_sharded

logger = logging.get_logger(__name__)


# TRL trainers whose compute_loss MeZO evaluates exactly (MeZOSFTTrainer re-scopes SFTTrainer's fused LM head).
_VERIFIED_TRL_TRAINERS = {"_BaseTrainer", "BaseTrainer", "SFTTrainer"}


def _refuse_unverified_trl_parents(cls: type) -> None:
    """Refuse a TRL trainer MeZO is not known to perturb exactly, before any work (by name: TRL is not imported)."""
    trl_parents = [c.__name__ for c in cls.__mro__ if c.__module__.split(".")[0] == "trl"]
    unverified = [name for name in trl_parents if name not in _VERIFIED_TRL_TRAINERS]
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


class MeZOMixin:
    """MeZO (no backward pass) for a `Trainer` subclass: put it first, `class X(MeZOMixin, SomeTrainer)`.

    Accepts a `MeZOConfig`, or plain `TrainingArguments` (then the paper's MeZO defaults apply:
    ε = 1e-3, one Gaussian direction per step). An optimizer passed through `optimizers=` must be a
    `ZerothOrderSGD`. `objective`: a callable `objective(model, inputs) -> scalar tensor` (or the name of a
    built-in one) to minimize instead of the model's loss; it need not be differentiable.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *pargs,
        objective: Objective | str | None = None,
        **kwargs,
    ):
        if args is None:
            raise ValueError(
                f"{type(self).__name__} needs `args`: a MeZOConfig (or TrainingArguments) with output_dir set."
            )
        zo = zo_settings(args)  # validates before any work
        _refuse_unverified_trl_parents(type(self))
        refuse_unsupported_options(args)
        if args.n_gpu > 1:
            raise ValueError(
                f"n_gpu={args.n_gpu} would run MeZO under torch.nn.DataParallel (several GPUs, one process), whose "
                "replicas are copied before MeZO's perturbation runs, so GPUs ≥ 1 would evaluate θ instead of θ ± εz. "
                "Launch one process per GPU with `accelerate launch` (or torchrun), or expose one GPU "
                "(CUDA_VISIBLE_DEVICES=0)."
            )
        # Not `self.objective`: the Trainer's hyperparameter search writes its metric there.
        self._zo_objective_argument = objective
        resolve_objective(objective if objective is not None else zo["zo_objective"])
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is not None and not isinstance(optimizer, ZerothOrderSGD):
            raise TypeError(
                f"{type(self).__name__} got optimizer {type(optimizer).__name__}, which needs gradients; MeZO computes none. "
                "Pass a hf_mezo.ZerothOrderSGD, or leave `optimizers` unset to get one from the config."
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            cls = kwargs["optimizer_cls_and_kwargs"][0]
            if not (isinstance(cls, type) and issubclass(cls, ZerothOrderSGD)):
                raise TypeError(
                    f"{type(self).__name__} got optimizer_cls_and_kwargs with {cls!r}; only ZerothOrderSGD works without gradients."
                )
        if isinstance(model, nn.Module) and zo["zo_train_top_layers"] is not None:
            freeze_all_but_top_layers(model, zo["zo_train_top_layers"])
        if isinstance(model, nn.Module):
            check_perturbable(model, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        if isinstance(model, nn.Module) and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"{type(self).__name__} got a model with no trainable parameters (requires_grad=False everywhere). "
                "Unfreeze the parameters to tune, or wrap the model with a peft adapter."
            )
        super().__init__(model, args, *pargs, **kwargs)

    @property
    def zo(self) -> dict[str, Any]:
        """The zeroth-order settings, read from `args` at each use: a hyperparameter search's trial sets them there."""
        return zo_settings(self.args)

    @property
    def zo_objective(self) -> Objective | None:
        """The objective of the perturbed passes (`objective=`, else `zo_objective` from the args), or None."""
        chosen = self._zo_objective_argument
        return resolve_objective(chosen if chosen is not None else self.zo["zo_objective"])

    # ---- optimizer ------------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """A `ZerothOrderSGD` over the trainable parameters, grouped like the Trainer's AdamW."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            # Here rather than in __init__ only: a model from `model_init`, and a trial's zo_train_top_layers.
            if self.zo["zo_train_top_layers"] is not None:
                freeze_all_but_top_layers(opt_model, self.zo["zo_train_top_layers"])
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            check_perturbable(opt_model, named)
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = [
                {"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            seed = self.zo["zo_seed"] if self.zo["zo_seed"] is not None else self.args.seed
            self.optimizer = ZerothOrderSGD(
                [g for g in groups if g["params"]],
                lr=self.args.learning_rate,
                eps=self.zo["zo_eps"],
                method=self.zo["zo_method"],
                **method_knobs(self.zo),
                seed=seed,
                stochastic_rounding=self.zo["zo_stochastic_rounding"],
            )
        self.zo_optimizer.set_reduction(self._mean_across_processes)
        return self.optimizer

    @property
    def zo_optimizer(self) -> ZerothOrderSGD:
        """The `ZerothOrderSGD` behind the (possibly Accelerate-wrapped) optimizer."""
        optimizer = self.optimizer
        while not isinstance(optimizer, ZerothOrderSGD):
            inner = getattr(optimizer, "optimizer", None)
            if inner is None:
                raise TypeError(
                    f"{type(self).__name__}'s optimizer is {type(self.optimizer).__name__}, not a ZerothOrderSGD."
                )
            optimizer = inner
        return optimizer

    def _mean_across_processes(self, projected_grads: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return projected_grads
        return self.accelerator.reduce(projected_grads, reduction="mean")

    # ---- the step -------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The Trainer's prefetch of one optimizer step's micro-batches, plus MeZO's own label count.

        `num_items_in_batch` reaches only models that honour it; many (e.g. RoBERTa's heads) accept
        `**kwargs` yet average their loss per micro-batch, so under accumulation the stock Trainer's loss
        is off by the number of micro-batches. MeZO instead weights each micro-batch's mean loss by its
        share of the step's labelled items, which is exact for any mean-reduced loss.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = [self._count_label_items(batch) for batch in batch_samples]
        total = None
        if counts and all(c is not None for c in counts):
            total = torch.tensor(float(sum(counts)), device=device)
            if self._zo_tokens_across_processes:
                total = self.accelerator.gather(total.reshape(1)).sum()
        self._zo_step_items = None if total is None else float(total)
        return batch_samples, num_items_in_batch

    @property
    def _zo_tokens_across_processes(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.accelerator.num_processes > 1

    def _count_label_items(self, batch: dict[str, Any]) -> int | None:
        """Items a mean-reduced loss averages over: labels ≠ -100 (shifted for causal LMs), as the Trainer counts."""
        if not isinstance(batch, dict) or "labels" not in batch or not torch.is_tensor(batch["labels"]):
            return None
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        elif self._loss_shifts_labels:
            labels = batch["labels"][..., 1:]
        else:
            labels = batch["labels"]
        return int(labels.ne(-100).sum())

    def _micro_batch_weight(self, inputs: dict[str, Any], num_items_in_batch) -> tuple[float, Any]:
        """(weight of this micro-batch's loss in the step's objective, num_items_in_batch to pass on)."""
        own_objective = self.zo_objective is not None  # compute_loss_func / loss_is_scaled_for_ga concern compute_loss
        if not own_objective and (self.compute_loss_func is not None or self.loss_is_scaled_for_ga):
            return 1.0, num_items_in_batch  # the loss is already normalized over the whole step
        items, total = self._count_label_items(inputs), getattr(self, "_zo_step_items", None)
        if (own_objective or self.loss_is_scaled_for_ga is None) and items is not None and total:
            # Mean over this micro-batch × its share of the step's items = the step's mean over all items.
            # Across processes (average_tokens_across_devices) the share is of the global count, and the
            # cross-process *mean* of the projected gradients needs the factor num_processes back.
            scale = self.accelerator.num_processes if self._zo_tokens_across_processes else 1
            return items * scale / total, None
        return 1.0 / self.current_gradient_accumulation_steps, None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The method's forward passes (MeZO: θ ± εz); accumulates the estimate into the optimizer; returns the
        loss to log ((L₊ + L₋) / 2 for two-point estimates, the unperturbed loss for one-sided ones)."""
        optimizer = self.zo_optimizer
        inputs = self._prepare_inputs(inputs)
        weight, loss_items = self._micro_batch_weight(inputs, num_items_in_batch)
        contributes = weight != 0.0  # a micro-batch without labelled items contributes nothing to g...
        if not contributes and not self._zo_runs_collectives(model):
            return torch.zeros((), device=self.args.device)
        # ...but a sharded (FSDP2) model runs it anyway: every rank must join every forward's all-gathers.
        model.eval()  # dropout off: every pass must see the same function of θ
        mean_losses = []
        try:
            losses = []
            for probe, scale in optimizer.passes():  # MeZO: (0, +ε), (0, −ε); one-sided methods add (None, 0)
                with self._zo_pass(model, optimizer, probe, scale):
                    with self.compute_loss_context_manager():
                        loss = self.compute_zo_loss(model, dict(inputs), num_items_in_batch=loss_items)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                # float64: L₊ − L₋ is a small difference of two close numbers
                losses.append(loss.detach().double() * weight)
            if contributes:
                optimizer.accumulate_passes(losses)
                if not all(torch.isfinite(loss) for loss in losses):
                    logger.warning(
                        f"MeZO step {self.state.global_step}: non-finite loss in a perturbed pass "
                        f"({[loss.item() for loss in losses]}); this step's update will be skipped."
                    )
                mean_losses.append(optimizer.mean_loss(losses))
        finally:
            model.train()  # as the stock training_step leaves it
        if not mean_losses:
            return torch.zeros((), device=self.args.device)
        return torch.stack(mean_losses).mean().float().to(self.args.device)

    @staticmethod
    def _zo_pass(model: nn.Module, optimizer: ZerothOrderSGD, probe: int | None, scale: float):
        """The context of one pass: θ + scale·z_probe, or the model as it is for an unperturbed pass."""
        if probe is None:
            return torch.no_grad()
        return perturbed(model, optimizer, probe, scale)

    def _zo_runs_collectives(self, model: nn.Module) -> bool:
        """Whether each forward is a collective across ranks (FSDP2 shards are all-gathered in it)."""
        return any(is_sharded(p) for _, p, _ in self.zo_optimizer.named_trainable_parameters())

    def _inner_training_loop(self, *args, **kwargs):
        # `auto_find_batch_size` re-enters the loop after an out-of-memory error with a smaller batch; the
        # projected gradients of the abandoned partial step must not leak into the retried step's update.
        if self.optimizer is not None:
            self.zo_optimizer.discard_step()
        return super()._inner_training_loop(*args, **kwargs)

    def compute_zo_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The scalar one perturbed pass measures: the objective if one was given, else `compute_loss`.

        Logits are upcast to float32 meanwhile (`zo_float32_logits`), so the loss of a bf16/fp16 model is
        computed in float32 and L₊ − L₋ keeps its small difference.
        """
        with float32_logits(model, enabled=self.zo["zo_float32_logits"]):
            objective = self.zo_objective
            if objective is not None:
                return objective(model, inputs)
            return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    # The Trainer clips and measures `.grad` before `optimizer.step()`; MeZO has none. Report the projected
    # gradient instead (averaged across processes), so `grad_norm` in the logs means |g|.
    def _clip_grad_norm(self, model: nn.Module) -> float:
        return self.zo_optimizer.projected_grad_norm()

    def _get_grad_norm(self, model: nn.Module, grad_norm: float | None = None) -> float:
        return self.zo_optimizer.projected_grad_norm() if grad_norm is None else grad_norm

    # ---- distributed (hf_mezo.distributed) -------------------------------------------------------

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        # Data-parallel MeZO exchanges n scalars a step and needs no DDP (whose gradient buckets would
        # double the trainable weights' memory): the model is prepared without it, replicas synced once.
        return wrap_model_for_mezo(self, super()._wrap_model, model, training, dataloader)

    def check_rank_consistency(self, where: str = "on demand") -> None:
        """Raise `RankDivergenceError` unless every process holds the same trainable weights and direction stream.

        Runs before each checkpoint and evaluation; a collective, so call it on every process.
        """
        if self.optimizer is None:
            check_rank_consistency(self.model, where=where)
        else:
            optimizer = self.zo_optimizer
            named = [(name, p) for name, p, _ in optimizer.named_trainable_parameters()]
            check_rank_consistency(named, optimizer, where=where)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self.check_rank_consistency("checkpoint save")
        super()._save_checkpoint(model, trial)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self.check_rank_consistency("evaluation")
        return super().evaluate(*args, **kwargs)


class MeZOTrainer(MeZOMixin, Trainer):
    """Drop-in replacement for `transformers.Trainer` that trains with MeZO (no backward pass).

    See `MeZOMixin` for the arguments, `MeZOConfig` for the `zo_*` settings.
    """
