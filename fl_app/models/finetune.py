"""Fine-tuning a declared subset of a model's parameters (``profile.finetune``), framework-free.

A federated job that starts from the public checkpoint may train only part of each model -- the VQ-VAE's
last decoder blocks, its biases, the prior's last block and condition embeddings -- and keep the rest frozen
at the checkpoint. Under DP this is what keeps the model useful: the DP-SGD noise grows with the square root
of the number of trainable parameters, and the frozen ones are public already (they *are* the checkpoint), so
only the trainable ones are optimised, noised, accounted and sent (docs/PRIVACY.md).

    names = apply_trainable(model, profile.finetune.vqvae)   # requires_grad False elsewhere
    opt = make_optimizer(model, profile)                     # trainable parameters only
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fl_app.config import FINETUNE_PRESETS, ConfigError

__all__ = ["apply_trainable", "expand_patterns", "exported_names", "frozen_changes", "trainable_names"]


def expand_patterns(model: nn.Module, items: Sequence[str]) -> list[str]:
    """Preset names -> their ``fnmatch`` patterns (``{last}`` = index of the model's last block)."""
    last = max(len(getattr(model, "blocks", [])) - 1, 0)
    out: list[str] = []
    for item in items:
        for pat in FINETUNE_PRESETS.get(item, (item,)):
            out.append(pat.replace("{last}", str(last)))
    return out


def trainable_names(model: nn.Module, items: Sequence[str], kind: str = "model") -> list[str]:
    """Names of ``model``'s parameters matched by ``items`` (presets / patterns), in model order.

    Raises:
        ConfigError: an item matches no parameter (naming the item and ``finetune.<kind>``).
    """
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in items:
        pats = expand_patterns(model, [item])
        hit = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)}
        if not hit:
            raise ConfigError(f"finetune.{kind}: {item!r} matches no parameter of the {kind} model")
        chosen |= hit
    return [n for n in names if n in chosen]


def apply_trainable(model: nn.Module, items: Sequence[str], kind: str = "model") -> list[str]:
    """Freeze every parameter not in ``items`` (``requires_grad = False``); returns the trainable names."""
    keep = set(trainable_names(model, items, kind))
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return [n for n, _ in model.named_parameters() if n in keep]


def exported_names(model: nn.Module, items: Sequence[str], kind: str = "model") -> list[str] | None:
    """The state-dict entries a site sends: None (all of them) for a whole-model job, else the trainable ones."""
    if list(items) == ["all"]:
        return None
    return trainable_names(model, items, kind)


def frozen_changes(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], trainable: Sequence[str]
) -> list[str]:
    """Entries of ``state`` outside ``trainable`` that are not byte-identical to ``reference``."""
    keep = set(trainable)
    bad = []
    for k, v in state.items():
        if k in keep:
            continue
        ref = reference.get(k)
        if ref is None or ref.shape != v.shape or ref.dtype != v.dtype or not torch.equal(ref.cpu(), v.cpu()):
            bad.append(k)
    return bad
