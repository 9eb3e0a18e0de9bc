"""The estimator identity through `MeZOTrainer`, in float64, on the models that break module-scoped perturbation.

After one step with lr = η and no weight decay, θ₁ = θ₀ − η·g·z, so g = −⟨θ₁ − θ₀, z⟩ / (η·|z|²). In float64
with ε = 1e-6, g = (L(θ₀ + εz) − L(θ₀ − εz)) / 2ε equals the directional derivative zᵀ∇L(θ₀) to ~1e-10
relative; autograd on an untouched copy of the model gives zᵀ∇L independently. A pass that saw θ instead of
θ ± εz anywhere (a tied head read outside its module, a replica, a hook that bypassed the perturbation) is
off by far more than 1e-6.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

import hf_mezo.perturbation.streamed as streamed
from hf_mezo import MeZOTrainer, PerturbationError, ZerothOrderSGD, perturbed
from hf_mezo.directions import draw_direction

from .conftest import mezo_args, tiny_roberta_config

ETA, EPS, SEED = 1e-3, 1e-6, 0
VOCAB = 60


def _mlm_rows(n=4, length=8, vocab=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(ids, labels)]


def _autograd_directional_derivative(model, rows, names_z):
    reference = copy.deepcopy(model).eval()
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    loss = reference(**batch).loss
    named = dict(reference.named_parameters())
    grads = torch.autograd.grad(loss, [named[n] for n in names_z])
    return sum(float((grad * z).sum()) for grad, z in zip(grads, names_z.values()))


def _z(name, param):
    return draw_direction(
        name,
        param.numel(),
        run_seed=SEED,
        step=0,
        direction=0,
        distribution="gaussian",
        dtype=torch.float64,
        device=param.device,
    ).view_as(param)


def check_estimator_identity(model, tmp_path, rows=None, **config):
    """Train one MeZO step on `model` (float64) and compare the implied g with autograd's zᵀ∇L."""
    rows = rows or _mlm_rows()
    if any(p.dtype != torch.float64 for p in model.parameters()):
        model = model.double()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names_z = {n: _z(n, p) for n, p in trainable.items()}
    expected = _autograd_directional_derivative(model, rows, names_z)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    args = mezo_args(
        tmp_path,
        per_device_train_batch_size=len(rows),
        learning_rate=ETA,
        zo_eps=EPS,
        weight_decay=0.0,
        seed=SEED,
        **config,
    )
    trainer = MeZOTrainer(model, args, train_dataset=rows)
    trainer.train()
    after = dict(model.named_parameters())
    numerator = sum(float(((after[n].detach() - before[n]) * z).sum()) for n, z in names_z.items())
    implied = -numerator / (ETA * sum(float((z * z).sum()) for z in names_z.values()))
    assert implied == pytest.approx(expected, rel=1e-6), (implied, expected)
    return trainer


class FunctionalTiedHead(nn.Module):
    """An LM whose output head reads the embedding matrix through F.linear: outside the embedding's forward."""

    def __init__(self, vocab=VOCAB, hidden=8):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.LayerNorm(hidden))

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = F.linear(self.body(self.embeddings(input_ids)), self.embeddings.weight)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


def test_functional_tied_head(tmp_path):
    torch.manual_seed(0)
    model = FunctionalTiedHead()
    trainer = check_estimator_identity(model, tmp_path)
    plan = model.__dict__["_zo_perturbation_plan"]
    assert plan.read_outside == ["embeddings.weight"]  # found by the read monitor, moved to whole-forward
    assert trainer.state.global_step == 1


def test_deberta_v2_masked_lm_non_legacy_head(tmp_path):
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    config = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        legacy=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = DebertaV2ForMaskedLM(config)
    check_estimator_identity(model, tmp_path)
    assert "deberta.embeddings.word_embeddings.weight" in model.__dict__["_zo_perturbation_plan"].read_outside


def test_albert_shared_layer_runs_many_times(tmp_path):
    from transformers import AlbertConfig, AlbertForMaskedLM

    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = AlbertForMaskedLM(config)
    check_estimator_identity(model, tmp_path)
    repeated = model.__dict__["_zo_perturbation_plan"].repeated
    assert any("albert_layer_groups.0" in name for name in repeated)  # the shared layer: held, not re-swapped


def test_streamed_vocabulary_matrix(tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 500)  # the 60×16 tied matrix is streamed
    monkeypatch.setattr(streamed, "BLOCK_NUMEL", 7 * 16)
    calls = []
    original = streamed.streamed_forward
    monkeypatch.setattr(streamed, "streamed_forward", lambda m, s: calls.append(type(m).__name__) or original(m, s))
    torch.manual_seed(0)
    from transformers import RobertaForMaskedLM

    check_estimator_identity(RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB)), tmp_path)
    assert {"Embedding", "Linear"} <= set(calls)


class CountingHook:
    """An Accelerate `ModelHook` that counts the forwards it wraps."""

    def __new__(cls):
        from accelerate.hooks import ModelHook

        class _Counting(ModelHook):
            calls = 0

            def pre_forward(self, module, *args, **kwargs):
                type(self).calls += 1
                return args, kwargs

        return _Counting()


def test_accelerate_dispatch_hooks_stay_attached_and_working(tmp_path, monkeypatch):
    from accelerate import dispatch_model
    from accelerate.hooks import add_hook_to_module
    from transformers import RobertaForMaskedLM

    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 500)  # stream the decoder under its hook
    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB)).double()
    device_map = {"roberta.embeddings": "cpu", "roberta.encoder": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    counting = CountingHook()
    add_hook_to_module(model.lm_head.decoder, counting, append=True)
    hooked = [name for name, m in model.named_modules() if hasattr(m, "_hf_hook")]
    check_estimator_identity(model, tmp_path)
    assert [name for name, m in model.named_modules() if hasattr(m, "_hf_hook")] == hooked
    assert "forward" in model.lm_head.decoder.__dict__  # Accelerate's wrapper, not ours and not deleted
    calls = type(counting).calls
    assert calls >= 2  # both perturbed passes went through the hook
    model(**{k: v.unsqueeze(0) for k, v in _mlm_rows(1)[0].items()})
    assert type(counting).calls == calls + 1  # and it still runs after training


def test_cpu_offloaded_frozen_module_keeps_its_hook(tmp_path):
    from accelerate import cpu_offload
    from transformers import RobertaForMaskedLM

    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB, tie_word_embeddings=False)).double()
    model.roberta.embeddings.requires_grad_(False)
    model.lm_head.bias.requires_grad_(False)  # untied from the decoder, unused by the forward
    cpu_offload(model.roberta.embeddings, execution_device=torch.device("cpu"))
    model.hf_device_map = {
        "roberta.embeddings": "cpu",
        "roberta.encoder": "cpu",
        "lm_head": "cpu",
    }  # as from_pretrained
    assert model.roberta.embeddings.word_embeddings.weight.is_meta
    check_estimator_identity(model, tmp_path)
    assert hasattr(model.roberta.embeddings, "_hf_hook")
    assert model.roberta.embeddings.word_embeddings.weight.is_meta  # still offloaded after training


def test_offloaded_trainable_parameters_are_refused(tmp_path):
    from accelerate import cpu_offload
    from transformers import RobertaForMaskedLM

    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB, tie_word_embeddings=False))
    cpu_offload(model.roberta.embeddings, execution_device=torch.device("cpu"))
    optimizer = ZerothOrderSGD(model.named_parameters())
    with pytest.raises(PerturbationError, match="offload"):
        with perturbed(model, optimizer, 0, 1e-3):
            pass


def test_data_parallel_is_refused():
    model = nn.DataParallel(nn.Linear(2, 2))
    with pytest.raises(PerturbationError, match="accelerate launch"):
        with perturbed(model, ZerothOrderSGD(model.named_parameters()), 0, 1e-3):
            pass


def test_a_forward_that_writes_a_trainable_parameter_is_refused():
    class Writes(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            self.bias.mul_(1.0)  # in place, inside the forward
            return out

    model = Writes(2, 2)
    optimizer = ZerothOrderSGD(model.named_parameters())
    with pytest.raises(PerturbationError, match="'bias'.*in place"):
        with perturbed(model, optimizer, 0, 1e-3):
            model(torch.ones(1, 2))


def test_the_monitored_pass_and_the_planned_passes_see_the_same_values():
    """Pass 1 runs under the read monitor, pass 2 under the learned plan: bit-identical losses."""
    torch.manual_seed(0)
    model = FunctionalTiedHead()
    rows = _mlm_rows()
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    optimizer = ZerothOrderSGD(model.named_parameters())
    losses = []
    for _ in range(2):
        with perturbed(model, optimizer, 0, 1e-2):
            losses.append(model(**batch).loss)
    explicit = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), explicit.parameters()):
            q.copy_(optimizer.perturbed(p, 0, 1e-2))
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(losses[0], explicit(**batch).loss)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_keeps_the_perturbation_outside_the_graph(tmp_path, backend):
    from torch._dynamo.utils import counters
    from transformers import RobertaForMaskedLM

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB))
    trainer = check_estimator_identity(model, tmp_path, torch_compile=True, torch_compile_backend=backend)
    plan = trainer.model_wrapped.__dict__["_zo_perturbation_plan"]
    assert plan.key[0] and len(plan.whole) == len(list(model.parameters()))  # compiled: all held, no hooks
    assert counters["stats"]["unique_graphs"] == 1  # both passes ran the one compiled graph, no recompile
