"""Load SST-2 as a `datasets.DatasetDict` with `train`, `validation` and `test` splits.

Three sources, one output shape (columns ``sentence``: string, ``label``: ClassLabel negative/positive):

- an LM-BFF / MeZO few-shot directory, ``{k}-{seed}/{train,dev,test}.tsv`` (k ∈ {16, 512}, seeds
  13, 21, 42, 87, 100 in the papers); the 16-42 and 512-42 splits ship inside this package;
- a GLUE directory with ``train.tsv``, ``dev.tsv`` and optionally ``test.tsv`` (GLUE's test has no
  labels: they are set to -1, as the hub's copy does);
- the hub dataset ``nyu-mll/glue`` config ``sst2`` (needs network access).

TSVs are read without quote handling: SST sentences contain bare ``"`` characters.
"""

from __future__ import annotations

import csv
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

SST2_DATA_DIR = Path(__file__).resolve().parent / "sst2"
SHIPPED_KSHOT_DIR = SST2_DATA_DIR / "k-shot-1k-test" / "SST-2"
SST2_LABEL_NAMES = ("negative", "positive")
SST2_FEATURES = Features({"sentence": Value("string"), "label": ClassLabel(names=list(SST2_LABEL_NAMES))})
HUB_NAME, HUB_CONFIG = "nyu-mll/glue", "sst2"
# File name of each split in both the GLUE and the LM-BFF/MeZO layouts.
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def shipped_kshot_splits() -> list[tuple[int, int]]:
    """The (k, seed) few-shot splits that ship with the package."""
    found = []
    for path in SHIPPED_KSHOT_DIR.glob("*-*"):
        k, _, seed = path.name.partition("-")
        if k.isdigit() and seed.isdigit():
            found.append((int(k), int(seed)))
    return sorted(found)


def read_sst2_tsv(path: str | Path, *, cache_dir: str | None = None) -> Dataset:
    """One SST-2 TSV as a `Dataset` of (sentence, label); a file without labels gets label -1.

    Accepts the ``sentence\\tlabel`` layout (GLUE train/dev, LM-BFF/MeZO splits) and GLUE's unlabeled
    ``index\\tsentence`` test file.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    if "sentence" not in header:
        raise ValueError(f"{path} has columns {header}; an SST-2 TSV needs a 'sentence' column (and 'label').")
    dataset = load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,  # a sentence reading "null" or "nan" stays a string
        # Read every sentence as a string (pandas would make "1995" a number), every other column as an integer.
        features=Features({name: Value("string" if name == "sentence" else "int64") for name in header}),
        cache_dir=cache_dir,
    )
    if "label" not in header:
        dataset = dataset.add_column("label", [-1] * len(dataset))
    dataset = dataset.select_columns(["sentence", "label"])
    return dataset.cast(SST2_FEATURES)


def load_sst2_dir(data_dir: str | Path, *, cache_dir: str | None = None) -> DatasetDict:
    """A directory holding ``train.tsv`` and ``dev.tsv`` (+ optional ``test.tsv``): GLUE or one few-shot split."""
    data_dir = Path(data_dir)
    missing = [name for split, name in SPLIT_FILES.items() if split != "test" and not (data_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"{data_dir} has no {' or '.join(missing)}; expected a GLUE SST-2 directory (train.tsv, dev.tsv, "
            "test.tsv) or an LM-BFF/MeZO few-shot directory like .../SST-2/512-42."
        )
    return DatasetDict(
        {
            split: read_sst2_tsv(data_dir / name, cache_dir=cache_dir)
            for split, name in SPLIT_FILES.items()
            if (data_dir / name).is_file()
        }
    )


def kshot_dir(k: int, seed: int, data_dir: str | Path | None = None) -> Path:
    """Where the (k, seed) few-shot split lives: in the package, or under `data_dir`.

    `data_dir` may be the split itself (``.../SST-2/512-42``), its parent (``.../SST-2``) or the
    generator's output root (``.../k-shot-1k-test``, holding ``SST-2/``).
    """
    name = f"{k}-{seed}"
    if data_dir is None:
        if (k, seed) not in shipped_kshot_splits():
            raise ValueError(
                f"the {name} split of SST-2 is not shipped (shipped: "
                f"{', '.join(f'{k}-{s}' for k, s in shipped_kshot_splits())}); generate it with MeZO's "
                "tools/generate_k_shot_data.py --mode k-shot-1k-test and pass data_dir."
            )
        return SHIPPED_KSHOT_DIR / name
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / name, data_dir / "SST-2" / name):
        if candidate.name == name and (candidate / "train.tsv").is_file():
            return candidate
    raise ValueError(
        f"no few-shot split {name} under {data_dir}: looked for {data_dir}/{name}/train.tsv and "
        f"{data_dir}/SST-2/{name}/train.tsv. For a full GLUE directory pass k=None."
    )


def load_sst2(
    k: int | None = 512,
    seed: int = 42,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | None = None,
) -> DatasetDict:
    """SST-2 as a `DatasetDict` with splits train / validation / test (columns sentence, label).

    Args:
        k: examples per class of a few-shot split (LM-BFF/MeZO layout ``{k}-{seed}``). None: the full
            data set, from the GLUE directory `data_dir`, or from the hub if `data_dir` is None.
        seed: the data seed of the few-shot split (13, 21, 42, 87, 100 in LM-BFF and MeZO).
        data_dir: where the TSVs are. None with k set: the splits shipped in the package (16-42, 512-42).
        cache_dir: `datasets` cache directory (default: the `datasets` default).

    For the few-shot splits, ``test`` is the labeled GLUE dev set (872 sentences) and ``validation``
    is k per class drawn from GLUE train, disjoint from ``train`` — MeZO's k-shot-1k-test recipe.
    """
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive integer (examples per class) or None for the full data, got {k!r}.")
    if k is not None:
        return load_sst2_dir(kshot_dir(k, seed, data_dir), cache_dir=cache_dir)
    if data_dir is not None:
        return load_sst2_dir(data_dir, cache_dir=cache_dir)
    # The hub's copy: train/validation/test with columns sentence, label (test: -1), idx.
    dataset = load_dataset(HUB_NAME, HUB_CONFIG, cache_dir=cache_dir)
    return dataset.select_columns(["sentence", "label"])
