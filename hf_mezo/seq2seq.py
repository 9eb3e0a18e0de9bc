"""`MeZOSeq2SeqTrainer`: `Seq2SeqTrainer` trained with MeZO; `MeZOSeq2SeqConfig` = its arguments + the `zo_*` fields.

Training is `MeZOMixin`'s; evaluation and prediction are `Seq2SeqTrainer`'s own, so
`predict_with_generate=True` generates with the MeZO-trained weights. Encoder-decoder losses are
aligned with unshifted labels: the Trainer's label count, which weights micro-batches under gradient
accumulation, does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .config import ZerothOrderArguments
from .trainer import MeZOMixin


@dataclass
class MeZOSeq2SeqConfig(ZerothOrderArguments, Seq2SeqTrainingArguments):
    """Arguments for `MeZOSeq2SeqTrainer`: everything `Seq2SeqTrainingArguments` has (`predict_with_generate`,
    `generation_max_length`, ...), plus the `zo_*` fields (`ZerothOrderArguments`)."""


class MeZOSeq2SeqTrainer(MeZOMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with MeZO's zeroth-order step; same arguments, plus `objective=`."""
