"""Models, built from a `ModelConfig` for a data set's `DataInfo`.

`build_model` is the only place parameters are initialized, and it is a pure function of
(config, data info, seed): every rank builds the same bits on its own, so replicas start in
sync without a broadcast, and a checkpoint can be checked against a fresh build.
"""

from __future__ import annotations

import torch
from torch import nn

from distshare.config import ModelConfig
from distshare.data.types import DataInfo
from distshare.errors import ConfigError
from distshare.models.attention import TinyTransformer
from distshare.models.cnn import SmallCNN

__all__ = ["SmallCNN", "TinyTransformer", "build_model"]

_NEEDS = {"transformer": "text", "cnn": "image"}  # model name -> the data kind it reads


def build_model(cfg: ModelConfig, info: DataInfo, seed: int) -> nn.Module:
    """Build the configured model with parameters drawn from `seed`, cast to `cfg.dtype`.

    The global RNG is left exactly as it was, so building a model (say, a reference copy in a
    test) never shifts the random stream of the code around it.

    Raises:
        ConfigError: unknown model name or dtype, or a model that cannot read this kind of data.
    """
    if cfg.name not in _NEEDS:
        raise ConfigError("model.name", f"unknown value {cfg.name!r}; expected one of {', '.join(_NEEDS)}")
    if info.kind != _NEEDS[cfg.name]:
        raise ConfigError("model.name", f"the {cfg.name} needs {_NEEDS[cfg.name]} data; the data set is {info.kind}")
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise ConfigError("model.dtype", f"unknown value {cfg.dtype!r}; expected float32 or float64")
    # devices=[]: parameters are created on the CPU, so only the CPU generator is forked and
    # seeded; torch.manual_seed would also reseed (and so disturb) every CUDA generator.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if cfg.name == "transformer":
            model: nn.Module = TinyTransformer(
                info, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, positional=cfg.positional
            )
        else:
            model = SmallCNN(info, cfg.conv_channels, cfg.kernel_size, norm=cfg.norm)
    return model.to(dtype)
