"""SST-2 loading with `datasets`: shipped few-shot splits, GLUE / LM-BFF / MeZO directories, or the hub."""

from .loading import (
    SHIPPED_KSHOT_DIR,
    SST2_DATA_DIR,
    SST2_LABEL_NAMES,
    kshot_dir,
    load_sst2,
    load_sst2_dir,
    read_sst2_tsv,
    shipped_kshot_splits,
)

__all__ = [
    "SHIPPED_KSHOT_DIR",
    "SST2_DATA_DIR",
    "SST2_LABEL_NAMES",
    "kshot_dir",
    "load_sst2",
    "load_sst2_dir",
    "read_sst2_tsv",
    "shipped_kshot_splits",
]
