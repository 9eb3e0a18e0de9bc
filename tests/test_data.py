"""SST-2 loading: shipped splits against a plain parse of their TSVs, directory layouts, the hub call."""

import hashlib

import pytest
from datasets import ClassLabel, DatasetDict

from hf_mezo.data import SHIPPED_KSHOT_DIR, SST2_DATA_DIR, kshot_dir, load_sst2, loading, shipped_kshot_splits

from .conftest import SHARED


def _parse_tsv(path):
    """The rows of a `sentence\\tlabel` TSV, parsed with nothing but str.split."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    return [(s, int(label)) for s, label in (line.split("\t") for line in lines[1:])]


def _write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, row)) for row in rows]) + "\n")


@pytest.mark.parametrize("k, rows", [(16, 32), (512, 1024)])
def test_shipped_kshot_splits_match_their_files(k, rows):
    splits = load_sst2(k=k, seed=42)
    assert isinstance(splits, DatasetDict) and set(splits) == {"train", "validation", "test"}
    assert splits["train"].features["label"] == ClassLabel(names=["negative", "positive"])
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv")):
        expected = _parse_tsv(SHIPPED_KSHOT_DIR / f"{k}-42" / name)
        assert list(zip(splits[split]["sentence"], splits[split]["label"])) == expected
    assert len(splits["train"]) == len(splits["validation"]) == rows
    assert splits["train"]["label"].count(1) == k  # k per class
    assert len(splits["test"]) == 872
    assert not set(splits["train"]["sentence"]) & set(splits["validation"]["sentence"])


def test_shipped_files_match_provenance_checksums():
    listed = dict(
        reversed(line.split("  ")) for line in (SST2_DATA_DIR / "SHA256SUMS.txt").read_text().splitlines() if line
    )
    assert len(listed) == 6 and (SST2_DATA_DIR / "PROVENANCE.md").is_file()
    for relative, digest in listed.items():
        assert hashlib.sha256((SST2_DATA_DIR / relative).read_bytes()).hexdigest() == digest, relative
    assert shipped_kshot_splits() == [(16, 42), (512, 42)]


def test_kshot_test_split_is_glue_dev():
    glue_dev = SHARED / "data" / "sst2" / "dev.tsv"
    if not glue_dev.is_file():
        pytest.skip("shared GLUE data not available")
    assert _parse_tsv(SHIPPED_KSHOT_DIR / "16-42" / "test.tsv") == _parse_tsv(glue_dev)


def test_unshipped_split_without_data_dir_is_an_error():
    with pytest.raises(ValueError, match="16-13 split of SST-2 is not shipped.*16-42, 512-42"):
        load_sst2(k=16, seed=13)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        load_sst2(k=0)


def test_kshot_directory_layouts(tmp_path):
    """A MeZO/LM-BFF tree: the root holding SST-2/, SST-2/ itself, or the {k}-{seed} folder."""
    rows = [('he said " wow " and left', 1), ("null", 0), ("1995", 1), ("nan", 0)]
    split_dir = tmp_path / "k-shot" / "SST-2" / "16-13"
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        _write_tsv(split_dir / name, ["sentence", "label"], rows)
    for data_dir in (tmp_path / "k-shot", tmp_path / "k-shot" / "SST-2", split_dir):
        assert kshot_dir(16, 13, data_dir) == split_dir
    splits = load_sst2(k=16, seed=13, data_dir=tmp_path / "k-shot", cache_dir=str(tmp_path / "cache"))
    # No quote handling, no NaN guessing, no number parsing of sentences.
    assert list(zip(splits["test"]["sentence"], splits["test"]["label"])) == rows
    with pytest.raises(ValueError, match="no few-shot split 16-21"):
        load_sst2(k=16, seed=21, data_dir=tmp_path / "k-shot")


def test_glue_directory_with_unlabeled_test(tmp_path):
    _write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [("good", 1), ("bad", 0), ("fine", 1)])
    _write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [("great", 1)])
    _write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [(0, "what ?"), (1, "meh")])
    splits = load_sst2(k=None, data_dir=tmp_path, cache_dir=str(tmp_path / "cache"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "validation": 1, "test": 2}
    assert splits["test"]["sentence"] == ["what ?", "meh"] and splits["test"]["label"] == [-1, -1]
    assert splits["test"].column_names == ["sentence", "label"]
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(ValueError, match="has no dev.tsv"):
        load_sst2(k=None, data_dir=tmp_path)


def test_hub_path_asks_for_glue_sst2(monkeypatch):
    """Offline we can only check the call: nyu-mll/glue, config sst2, columns reduced to sentence/label."""
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return DatasetDict({"train": loading.Dataset.from_dict({"sentence": ["x"], "label": [1], "idx": [0]})})

    monkeypatch.setattr(loading, "load_dataset", fake_load_dataset)
    splits = load_sst2(k=None)
    assert calls == [(("nyu-mll/glue", "sst2"), {"cache_dir": None})]
    assert splits["train"].column_names == ["sentence", "label"]
