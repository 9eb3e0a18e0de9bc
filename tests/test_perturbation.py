"""Module-scoped perturbation: exact, complete, and identical whether large weights are streamed or swapped."""

import pytest
import torch
from transformers import RobertaForMaskedLM

import hf_mezo.perturbation.streamed as streamed
from hf_mezo import ZerothOrderSGD, perturbed_forward

from .conftest import tiny_roberta_config


def _mlm(dtype=torch.float32):
    torch.manual_seed(0)
    return RobertaForMaskedLM(tiny_roberta_config(vocab_size=300)).to(dtype).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (4, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 4] = ids[:, 4]
    return {"input_ids": ids, "labels": labels}


def _losses(model, optimizer, inputs):
    out = []
    for scale in (1e-2, -1e-2):
        with perturbed_forward(model, optimizer, 0, scale):
            out.append(model(**inputs).logits)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_large_weights_give_bit_identical_outputs(monkeypatch, dtype):
    model, inputs = _mlm(dtype), _inputs()
    optimizer = ZerothOrderSGD(model.named_parameters())
    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 10**12)  # swap everything
    swapped = _losses(model, optimizer, inputs)
    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 1000)  # stream the 300×16 tied matrix...
    monkeypatch.setattr(streamed, "BLOCK_NUMEL", 7 * 16)  # ...in 7-row blocks that cut through z chunks
    calls = []
    original = streamed.streamed_forward
    monkeypatch.setattr(streamed, "streamed_forward", lambda m, *a: calls.append(type(m).__name__) or original(m, *a))
    streamed_out = _losses(model, optimizer, inputs)
    assert sorted(set(calls)) == ["Embedding", "Linear"]
    for a, b in zip(swapped, streamed_out):
        assert torch.equal(a, b)


def test_perturbation_is_exact_and_complete():
    model, inputs = _mlm(), _inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZerothOrderSGD(model.named_parameters())
    with perturbed_forward(model, optimizer, 0, 1e-3) as touched:
        perturbed_logits = model(**inputs).logits
    assert touched == {id(p) for p in model.parameters()}
    for n, p in model.named_parameters():  # restored bit for bit, same storage
        assert torch.equal(p, before[n]), n
    # The perturbed forward equals a forward of an explicitly perturbed copy.
    reference = _mlm()
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            q.copy_(optimizer.perturbed(p, 0, 1e-3))
    torch.testing.assert_close(perturbed_logits, reference(**inputs).logits, rtol=0, atol=0)
    assert not any(hasattr(m, "_zo_restore") or "forward" in m.__dict__ for m in model.modules())


def test_a_failing_forward_still_restores_the_parameters():
    model, inputs = _mlm(), _inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZerothOrderSGD(model.named_parameters())

    def fail(module, args, output):  # fails while lm_head's own (tied) bias is swapped
        raise RuntimeError("boom")

    model.lm_head.dense.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed_forward(model, optimizer, 0, 1e-3):
            model(**inputs)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_label_word_decoder_perturbs_only_its_rows_identically(monkeypatch):
    from hf_mezo.models import RobertaForPromptMaskedLM

    torch.manual_seed(0)
    model = RobertaForPromptMaskedLM(tiny_roberta_config(vocab_size=300)).eval()
    model.set_label_word_ids([17, 42], mask_token_id=4)
    inputs = _inputs()
    inputs["input_ids"][:, 4] = 4
    inputs["labels"][:, 4] = torch.tensor([17, 42, 42, 17])
    optimizer = ZerothOrderSGD(model.named_parameters())
    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 10**12)
    swapped = _losses(model, optimizer, inputs)
    monkeypatch.setattr(streamed, "STREAM_MIN_NUMEL", 1000)
    drawn = []
    original = optimizer.add_direction
    monkeypatch.setattr(
        optimizer,
        "add_direction",
        lambda v, p, *a, **kw: drawn.append((v.numel(), p.numel())) or original(v, p, *a, **kw),
    )
    rows = _losses(model, optimizer, inputs)
    assert swapped[0].shape == (4, 2)
    for a, b in zip(swapped, rows):
        assert torch.equal(a, b)
    row_draws = [n for n, whole in drawn if n == 16 and whole > n]  # slices of 16 (one row) of a matrix
    assert len(row_draws) == 4  # two label rows, in each of the two passes
