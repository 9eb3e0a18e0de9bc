"""The model card of a MeZO run says MeZO: the method, ε and the direction settings, not the Trainer's AdamW.

The Trainer's card lists `args.optim` as the optimizer ("Use OptimizerNames.ADAMW_TORCH_FUSED with
betas=…"): for a MeZO run that is false, and ε, the number of directions and the seed, which a reader
needs to reproduce the run, are missing. `MeZOMixin.create_model_card` lets the parent trainer write its
card (transformers' or TRL's, tags merged as usual) with the tags `mezo` and `zeroth-order`, then
`describe_mezo` replaces the optimizer line — or, for a card without one, adds a section — with
`mezo_description`.
"""

from __future__ import annotations

import os
import re
from typing import Any

MEZO_TAGS = ["mezo", "zeroth-order"]
_OPTIMIZER_LINE = re.compile(r"^- optimizer: .*?(?=^- |^$|\Z)", re.MULTILINE | re.DOTALL)


def mezo_description(settings: dict[str, Any], seed: int) -> str:
    """One line: the method and every setting its trajectory depends on."""
    return (
        "MeZO (hf_mezo.ZerothOrderSGD: zeroth-order SGD, two forward passes per direction and no backward pass; "
        "θ ← θ − lr·(mean_j g_j·z_j + wd·θ) with g_j = (L(θ + εz_j) − L(θ − εz_j)) / 2ε) with "
        f"zo_eps={settings['zo_eps']}, zo_num_directions={settings['zo_num_directions']}, "
        f"zo_distribution={settings['zo_distribution']}, direction seed={seed}, "
        f"zo_train_top_layers={settings['zo_train_top_layers']}, zo_objective={settings['zo_objective']}"
    )


def with_mezo_tags(tags: str | list[str] | None) -> list[str]:
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return tags + [t for t in MEZO_TAGS if t not in tags]


def describe_mezo(card_path: str, description: str) -> None:
    """Replace the card's optimizer line by `description`, or add a "MeZO" section when it has none."""
    if not os.path.isfile(card_path):
        return
    with open(card_path, encoding="utf-8") as file:
        card = file.read()
    line = f"- optimizer: {description}\n"
    if _OPTIMIZER_LINE.search(card):
        card = _OPTIMIZER_LINE.sub(lambda _: line, card, count=1)
    else:
        card = card.rstrip("\n") + f"\n\n## Training procedure: MeZO\n\nTrained with {description}.\n"
    with open(card_path, "w", encoding="utf-8") as file:
        file.write(card)
