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

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .buffers import BufferWatch
from .config import method_knobs, zo_settings
from .distributed import check_rank_consistency, wrap_model_for_mezo
from .divergence import NonFiniteGuard, first_non_finite
from .eval_mode import eval_mode
from .label_check import check_training_labels
from .label_items import loss_shifts_labels, shift_is_known
from .model_card import describe_mezo, mezo_description, with_mezo_tags
from .models import freeze_all_but_top_layers
from .objectives import Objective, resolve_objective
from .optimizer import ZerothOrderSGD
from .perturbation import check_perturbable, perturbed, unperturbed
from .precision import float32_logits
from .refusals import (
    refuse_changed_zo_settings_on_resume,
    refuse_data_parallel,
    refuse_gradient_optimizers,
    refuse_misplaced_mixin,
    refuse_uneven_last_batch,
    refuse_unsupported_options,
    refuse_unverified_trl_parents,
    warn_frozen_running_statistics,
)
from .seed_log import build_header, save_seed_log
from .shards import is_sharded

logger = logging.get_logger(__name__)


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
        if args is None:  # as the stock Trainer does; a plain TrainingArguments gets the paper's zo_* defaults
            logger.info("No `TrainingArguments` passed, using `output_dir=tmp_trainer`.")
            args = TrainingArguments(output_dir="tmp_trainer")
        zo = zo_settings(args)  # validates before any work
        refuse_unsupported_options(args)
        refuse_data_parallel(args)
        # Not `self.objective`: the Trainer's hyperparameter search writes its metric there.
        self._zo_objective_argument = objective
        resolve_objective(objective if objective is not None else zo["zo_objective"])
        refuse_gradient_optimizers(type(self).__name__, kwargs, ZerothOrderSGD)
        if isinstance(model, nn.Module) and zo["zo_train_top_layers"] is not None:
            freeze_all_but_top_layers(model, zo["zo_train_top_layers"])
        if isinstance(model, nn.Module):
            check_perturbable(model, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        if isinstance(model, nn.Module) and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"{type(self).__name__} got a model with no trainable parameters (requires_grad=False everywhere). "
                "Unfreeze the parameters to tune, or wrap the model with a peft adapter."
            )
        if isinstance(model, nn.Module):
            warn_frozen_running_statistics(model)
        collator = kwargs.get("data_collator", pargs[0] if pargs else None)
        if isinstance(model, nn.Module) and hasattr(collator, "check_model"):
            collator.check_model(model)  # VerbalizerDataCollator: the model must read its labels (see there)
        super().__init__(model, args, *pargs, **kwargs)

    def __init_subclass__(cls, **kwargs):
        # Checked when the class is defined: a wrong composition would otherwise train something else silently.
        super().__init_subclass__(**kwargs)
        refuse_unverified_trl_parents(cls)
        refuse_misplaced_mixin(cls, MeZOMixin)

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
        if self.zo["zo_seed_log"]:
            if any(is_sharded(p) for _, p, _ in self.zo_optimizer.named_trainable_parameters()):
                raise ValueError(
                    "zo_seed_log=True with FSDP2-sharded parameters: the log's fingerprint of the base weights and its "
                    "replay need whole tensors, which this process does not hold. Unset zo_seed_log, or train "
                    "data-parallel without FSDP (the seed log covers that)."
                )
            self.zo_optimizer.start_seed_log(build_header)
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
        if batch_samples and not getattr(self, "_zo_label_shift_measured", False):
            self._measure_label_shift(batch_samples[0])
        counts = [self._count_label_items(batch) for batch in batch_samples]
        total = None
        if counts and all(c is not None for c in counts):
            total = torch.tensor(float(sum(counts)), device=device)
            if self._zo_tokens_across_processes:
                total = self.accelerator.gather(total.reshape(1)).sum()
            if num_items_in_batch is not None:  # the Trainer's count, by the measured rule (same gather rule)
                num_items_in_batch = total.to(device)
        self._zo_step_items = None if total is None else float(total)
        return batch_samples, num_items_in_batch

    def _measure_label_shift(self, batch: dict[str, Any]) -> None:
        """Set the Trainer's `_loss_shifts_labels` from what the model's loss does (`label_items`), not `loss_type`."""
        self._zo_label_shift_measured = True
        if not isinstance(batch, dict) or shift_is_known(self.model):
            return
        shifts = loss_shifts_labels(self.model, self._prepare_inputs(dict(batch)))
        if shifts is not None and shifts != self._loss_shifts_labels:
            logger.info(
                f"{type(self.model).__name__}'s loss {'shifts' if shifts else 'does not shift'} its labels (measured), "
                f"although its loss_type says otherwise; labelled items are counted accordingly."
            )
            self._loss_shifts_labels = shifts

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
        mean_losses = []
        # Dropout off: every pass must see the same function of θ; train mode afterwards, as the stock step leaves it.
        with eval_mode(model):
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
        if not mean_losses:
            return torch.zeros((), device=self.args.device)
        return torch.stack(mean_losses).mean().float().to(self.args.device)

    @staticmethod
    def _zo_pass(model: nn.Module, optimizer: ZerothOrderSGD, probe: int | None, scale: float):
        """The context of one pass: θ + scale·z_probe, or the model as it is for an unperturbed pass."""
        if probe is None:
            return unperturbed(model, optimizer)
        return perturbed(model, optimizer, probe, scale)

    def _zo_runs_collectives(self, model: nn.Module) -> bool:
        """Whether each forward is a collective across ranks (FSDP2 shards are all-gathered in it)."""
        return any(is_sharded(p) for _, p, _ in self.zo_optimizer.named_trainable_parameters())

    def _inner_training_loop(self, *args, **kwargs):
        # `auto_find_batch_size` re-enters the loop after an out-of-memory error with a smaller batch; the
        # projected gradients of the abandoned partial step must not leak into the retried step's update.
        if self.optimizer is not None:
            self.zo_optimizer.discard_step()
        batch_size = args[0] if args else kwargs.get("batch_size", self._train_batch_size)
        if not self.accelerator.split_batches:
            refuse_uneven_last_batch(self.train_dataset, self.args, batch_size, self.accelerator.num_processes)
        check_training_labels(self.train_dataset, self.model, self.data_collator)
        self._zo_buffer_watch = BufferWatch(self.model)  # compared after the first step (`buffers`)
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

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """The parent's card (transformers' or TRL's) tagged `mezo`, its optimizer line saying MeZO and ε (`model_card`)."""
        super().create_model_card(*args, tags=with_mezo_tags(tags), **kwargs)
        if self.is_world_process_zero():
            seed = self.zo["zo_seed"] if self.zo["zo_seed"] is not None else self.args.seed
            describe_mezo(os.path.join(self.args.output_dir, "README.md"), mezo_description(self.zo, seed))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        configured = dict(self.zo_optimizer.param_groups[0]) if checkpoint is not None else {}
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            refuse_changed_zo_settings_on_resume(configured, self.zo_optimizer.param_groups[0], checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self.check_rank_consistency("checkpoint save")
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        self._write_seed_log(checkpoint)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._write_seed_log()
        return output

    def _write_seed_log(self, *also: str) -> None:
        """seed_log.json into output_dir (and `also`), from the main process; every rank holds the same log."""
        if self.optimizer is None or self.zo_optimizer.seed_log is None or not self.is_world_process_zero():
            return
        optimizer = self.zo_optimizer
        for directory in (self.args.output_dir, *also):
            save_seed_log(directory, optimizer.seed_log_header, optimizer.seed_log)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self.check_rank_consistency("evaluation")
        self._refuse_non_finite_weights("evaluation")
        return super().evaluate(*args, **kwargs)

    # ---- non-finite training (hf_mezo.divergence) ------------------------------------------------

    @property
    def _zo_guard(self) -> NonFiniteGuard:
        if getattr(self, "_zo_non_finite_guard", None) is None:
            self._zo_non_finite_guard = NonFiniteGuard()
        return self._zo_non_finite_guard

    def _non_finite_parameter(self) -> str | None:
        """A parameter holding NaN/inf on any process (a collective when several run), or None."""
        name = first_non_finite(self.model.named_parameters())
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor([int(name is not None)], device=self.args.device))
            if name is None and bool(flags.any()):
                name = "(on another process)"
        return name

    def _refuse_non_finite_weights(self, where: str) -> None:
        name = self._non_finite_parameter()
        if name is not None:
            raise self._zo_guard.weights_error(self.state.global_step, name, where)
        self._zo_guard.verified(self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every write of the weights (checkpoints, the final save, push_to_hub) passes here.
        self._refuse_non_finite_weights("checkpoint save" if _internal_call else "save_model")
        super().save_model(output_dir, _internal_call)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs) -> None:
        # After each optimizer step: a skipped (non-finite) step is accounted for before anything is logged or saved.
        losses_finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        self._zo_guard.after_step(self.state.global_step, losses_finite, self._non_finite_parameter)
        if getattr(self, "_zo_buffer_watch", None) is not None:
            self._zo_buffer_watch.warn_if_written()
            self._zo_buffer_watch = None
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The Trainer's logging_nan_inf_filter would log a skipped step's loss as the running average (0 right
        # after a log); a skipped step since the last log makes the logged training loss NaN.
        if "loss" in logs and self._zo_guard.unlogged_skip:
            logs["loss"] = float("nan")
            self._zo_guard.unlogged_skip = False
        super().log(logs, *args, **kwargs)


class MeZOTrainer(MeZOMixin, Trainer):
    """Drop-in replacement for `transformers.Trainer` that trains with MeZO (no backward pass).

    See `MeZOMixin` for the arguments, `MeZOConfig` for the `zo_*` settings.
    """
