"""The depth cache filled before training (with a progress bar): training then computes no frozen layer again."""

import torch
from torch.nn import functional as F

from hf_mezo import MeZOTrainer
from hf_mezo.cache_fill import fill_depth_cache
from hf_mezo.models import freeze_all_but_top_layers

from .conftest import mezo_args
from .test_models import LABEL_WORDS, POOL_LENGTHS, make_batch, make_models


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    pad = {"input_ids": 1, "attention_mask": 0, "labels": -100}
    return {
        key: torch.stack([F.pad(f[key], (0, width - len(f[key])), value=value) for f in features])
        for key, value in pad.items()
    }


def test_a_filled_cache_serves_every_training_forward(tmp_path, capsys):
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    examples = [{key: value[0] for key, value in make_batch([i]).items()} for i in range(len(POOL_LENGTHS))]
    args = mezo_args(tmp_path, max_steps=4, per_device_train_batch_size=4, disable_tqdm=False)
    trainer = MeZOTrainer(prompt, args, train_dataset=examples, data_collator=_collate)

    assert fill_depth_cache(trainer) == len(examples)
    assert (prompt.depth_cache.misses, prompt.depth_cache.hits) == (len(examples), 0)
    assert "Caching the frozen layers" in capsys.readouterr().err  # the progress bar
    trainer.train()
    # Hand count: 4 steps × 2 passes × 4 rows, all served from the cache; not one new miss.
    assert (prompt.depth_cache.misses, prompt.depth_cache.hits) == (len(examples), 32)


def test_nothing_to_fill_without_frozen_layers(tmp_path):
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    examples = [{key: value[0] for key, value in make_batch([i]).items()} for i in range(2)]
    trainer = MeZOTrainer(prompt, mezo_args(tmp_path), train_dataset=examples, data_collator=_collate)
    assert fill_depth_cache(trainer) == 0 and prompt.depth_cache.misses == 0


def test_a_run_shorter_than_an_epoch_is_left_to_fill_lazily(tmp_path):
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    examples = [{key: value[0] for key, value in make_batch([i]).items()} for i in range(len(POOL_LENGTHS))]
    args = mezo_args(tmp_path, max_steps=1, per_device_train_batch_size=4)  # 4 of the 8 examples
    trainer = MeZOTrainer(prompt, args, train_dataset=examples, data_collator=_collate)
    assert fill_depth_cache(trainer) == 0 and prompt.depth_cache.misses == 0
