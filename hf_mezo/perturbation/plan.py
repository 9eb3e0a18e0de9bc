"""The plan: for each trainable parameter, how the perturbed passes see it at θ ± εz.

- **module swap** (`module_swap`, the default): θ + εz is swapped in while the module that owns the
  parameter runs, and swapped back after; one module's parameters are perturbed at a time.
- **streamed** (`streamed`): a large `nn.Linear` / `nn.Embedding` weight (the vocabulary matrix) is
  perturbed block by block inside its module's computation, never materialized whole.
- **low-rank transient** (`low_rank`): an `nn.Linear` / `nn.Embedding` weight whose directions are
  factored (LOZO, ZO-Muon) adds the rank-r term s·(x·B)·Aᵀ to its output; the weight is never copied.
- **whole-forward** (`whole_forward`): θ + εz is held for the whole forward (one extra copy of the
  tensor). For parameters the forward reads outside their owner's `forward` (a functional tied head
  `F.linear(h, embeddings.weight)`), for owners whose forward runs more than once per pass (ALBERT's
  shared layer: swapping once instead of twelve times), and for every parameter of a compiled model
  (no hooks inside the graph).
- **sharded** (`sharded`): FSDP2 shards, perturbed after the all-gather; chosen for the whole model.

The first perturbed pass of a plan runs under the read monitor (`reads`), which finds the outside
reads and repeated modules, perturbs them on the spot so that pass is exact too, and moves them to
whole-forward for every later pass. The plan is kept on the model and rebuilt when the set of
trainable parameters changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import low_rank as low_rank_strategy
from . import streamed as streamed_strategy

_PLAN_ATTRIBUTE = "_zo_perturbation_plan"  # the plan of the latest pass
_PLANS_ATTRIBUTE = "_zo_perturbation_plans"
_MAX_PLANS = 8  # a model trained by a few optimizers in turn (benchmarks) keeps each one's plan


def is_compiled(model: nn.Module) -> bool:
    """A `torch.compile`d model (an `OptimizedModule`, or a module compiled in place with `.compile()`)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(model, OptimizedModule) or any(
        getattr(module, "_compiled_call_impl", None) is not None for module in model.modules()
    )


def _runs_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # containers (ParameterDict, ModuleList, ...) never run


def owned_trainable(model: nn.Module, trainable: set[int]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module whose forward perturbs them, its trainable parameters), in `model.modules()` order.

    Parameters held by a container without `forward` (`nn.ParameterDict`, e.g. peft's `lora_embedding_A`)
    belong to the nearest enclosing module that runs. A parameter shared by several modules (tied
    embeddings) is listed under each: the same seed gives the same z wherever it is perturbed.
    """
    owners: dict[int, tuple[nn.Module, list[nn.Parameter]]] = {}
    ancestors: dict[int, nn.Module] = {}  # id(module) -> nearest module at or above it that runs forward
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in ancestors:
            parent = ancestors.get(id(model.get_submodule(name.rpartition(".")[0]))) if name else None
            ancestors[id(module)] = module if _runs_forward(module) or parent is None else parent
        params = [p for p in module._parameters.values() if p is not None and id(p) in trainable]
        if params:
            owner = ancestors[id(module)]
            held = owners.setdefault(id(owner), (owner, []))[1]
            held.extend(p for p in params if all(p is not q for q in held))
    return list(owners.values())


@dataclass
class Plan:
    key: tuple
    swapped: list[tuple[nn.Module, list[nn.Parameter]]] = field(default_factory=list)
    streamed: list[tuple[nn.Module, nn.Parameter]] = field(default_factory=list)
    transient: list[tuple[nn.Module, nn.Parameter]] = field(default_factory=list)
    whole: list[nn.Parameter] = field(default_factory=list)
    learned: bool = False  # the read monitor has checked this plan on one pass
    read_outside: list[str] = field(default_factory=list)  # names moved to whole-forward, for messages
    repeated: list[str] = field(default_factory=list)

    def learn(self, outside: set[int], module_runs: dict[int, int], names: dict[int, str]) -> None:
        """Move the parameters read outside their owner, and those of owners run repeatedly, to whole-forward."""
        moved = set(outside)
        for owner, params in self.swapped:
            if module_runs.get(id(owner), 0) > 1:
                repeated = [p for p in params if id(p) not in moved]
                self.repeated += [names[id(p)] for p in repeated]
                moved.update(id(p) for p in repeated)
        self.read_outside += [names[i] for i in outside]
        whole_ids = {id(p) for p in self.whole}
        for _owner, params in self.swapped:
            self.whole += [p for p in params if id(p) in moved and id(p) not in whole_ids]
            whole_ids.update(id(p) for p in params if id(p) in moved)
        for _module, weight in self.streamed + self.transient:
            if id(weight) in moved and id(weight) not in whole_ids:
                self.whole.append(weight)
                whole_ids.add(id(weight))
        self.swapped = [(o, [p for p in ps if id(p) not in moved]) for o, ps in self.swapped]
        self.swapped = [(o, ps) for o, ps in self.swapped if ps]
        self.streamed = [(m, w) for m, w in self.streamed if id(w) not in moved]
        self.transient = [(m, w) for m, w in self.transient if id(w) not in moved]
        self.learned = True


def build_plan(model: nn.Module, trainable: list[nn.Parameter], key: tuple, optimizer=None) -> Plan:
    if is_compiled(model):
        # No hooks in the graph: every parameter held perturbed around the compiled forward. Exact
        # wherever it is read, hence nothing to learn.
        return Plan(key, whole=list(trainable), learned=True)
    plan = Plan(key)
    ids = {id(p) for p in trainable}
    for owner, params in owned_trainable(model, ids):
        swapped = []
        for p in params:
            if optimizer is not None and low_rank_strategy.applies(owner, p, optimizer):
                plan.transient.append((owner, p))
            elif streamed_strategy.streams(owner, p):  # in every owner of a tied matrix: same z in each
                plan.streamed.append((owner, p))
            else:
                swapped.append(p)
        if swapped:
            plan.swapped.append((owner, swapped))
    return plan


def plan_for(model: nn.Module, trainable: list[nn.Parameter], optimizer=None) -> Plan:
    """The model's plan for these trainable parameters, built on first use and kept on the model.

    `optimizer` (a `ZerothOrderSGD`) tells which weights have factored directions (low-rank transient).
    """
    factored = tuple(optimizer.factored(p) for p in trainable) if optimizer is not None else ()
    key = (is_compiled(model), streamed_strategy.STREAM_MIN_NUMEL, tuple(id(p) for p in trainable), factored)
    plans = model.__dict__.setdefault(_PLANS_ATTRIBUTE, {})  # by key: alternating optimizers keep their plans
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = build_plan(model, trainable, key, optimizer)
    model.__dict__[_PLAN_ATTRIBUTE] = plan
    return plan
