"""Label words defined once: the same answers on torch tensors and numpy arrays, one definition in the package."""

import re

import numpy as np
import pytest
import torch

from hf_mezo.label_words import IGNORE_INDEX, label_word_classes, labelled_positions

from .conftest import REPO


def test_positions_and_classes_agree_on_torch_and_numpy():
    labels = np.full((3, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4], labels[2, 0] = 31, 7, 31
    for as_type in (np.asarray, torch.as_tensor):
        positions = labelled_positions(as_type(labels))
        assert list(np.asarray(positions)) == [2, 4, 0]
        words = as_type(np.array([31, 7, IGNORE_INDEX, 31]))
        assert list(np.asarray(label_word_classes(words, [7, 31]))) == [1, 0, IGNORE_INDEX, 1]
        with pytest.raises(ValueError, match=r"token ids \[5\] at the mask, which are not label words \[7, 31\]"):
            label_word_classes(as_type(np.array([7, 5])), [7, 31])
    labels[0, 3] = 7
    with pytest.raises(ValueError, match=r"exactly one mask per example: rows \[0\] mark \[2\] positions"):
        labelled_positions(torch.as_tensor(labels))


def test_the_ignore_index_is_defined_once():
    definitions = [
        path.relative_to(REPO).as_posix()
        for path in (REPO / "hf_mezo").rglob("*.py")
        if re.search(r"^IGNORE_INDEX\s*=", path.read_text(), re.MULTILINE)
    ]
    assert definitions == ["hf_mezo/label_words.py"]
