"""Tied tensors: one tensor under two names (GPT-2's `wte.weight` and `lm_head.weight`).

`state_dict()` lists a tied weight under every name it has; stored naively it is written
twice and read back as two independent tensors. A checkpoint stores it once and records the
other names as aliases, and a load makes the aliases one tensor again.

Two names are one tensor only if they are the same *view* of the same storage: same storage,
offset, shape, stride and dtype. Sharing storage alone is not enough (a slice of a weight is
another tensor; it is stored on its own). safetensors' `save_model` makes the same
distinction (`_remove_duplicate_names` keeps only names covering the whole storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def shared_views(tensors: Mapping[str, torch.Tensor], prefer: Iterable[str] = ()) -> dict[str, str]:
    """Alias -> the name it is stored under, for names that are one view of one storage.

    The stored name is the first of `prefer` among the group (the name `named_parameters`
    gives, so a checkpoint's stored tensor is the one the live state names), else the first
    in the mapping's order.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        # Empty tensors may all sit at data pointer 0: they are not tied, they are empty.
        if t.numel() == 0 or t.device.type == "meta":
            continue
        try:
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
        except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage
            continue
        groups.setdefault(key, []).append(name)
    preferred = set(prefer)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = next((n for n in names if n in preferred), names[0])
        aliases.update({n: keep for n in names if n != keep})
    return aliases


def restore_ties(model: nn.Module, aliases: Mapping[str, str]) -> list[str]:
    """Make each alias the very tensor of its target again where `model` holds them apart.

    A model whose constructor ties the weights is already tied (then nothing changes); one built
    without the tie gets it back, so what was one tensor when saved is one tensor after the load.
    Returns the aliases re-tied.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    tied = []
    for alias, target in sorted(aliases.items()):
        pool = params if alias in params and target in params else buffers
        if alias not in pool or target not in pool or pool[alias] is pool[target]:
            continue
        owner, _, leaf = alias.rpartition(".")
        module = model.get_submodule(owner)
        if pool is params:
            setattr(module, leaf, pool[target])
        else:
            module._buffers[leaf] = pool[target]
        tied.append(alias)
    return tied
