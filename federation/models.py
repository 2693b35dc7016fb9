"""The model factory shared by the coordinator and every site."""

from __future__ import annotations

import torch
from torch import nn

from federation.config import ModelConfig

__all__ = ["build_model"]

_NORMS = {"instance": "instance", "group": "group", "batch": "batch"}


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> nn.Module:
    """Build the configured network, made DP-ready.

    BatchNorm is swapped for GroupNorm and in-place activations are turned off, so
    Opacus can compute per-sample gradients; the coordinator and the sites call this
    same function, so state-dict keys always match.

    Args:
        cfg: Model section of the run configuration.
        seed: Seed for the initial weights; `None` keeps torch's global state.

    Returns:
        The network in training mode.

    Raises:
        ValueError: The model name or norm is unknown, or the network stays
            incompatible with DP-SGD after the fix-ups.

    """
    from opacus.validators import ModuleValidator

    if cfg.name != "unet":
        raise ValueError(f"model.name={cfg.name!r} is unknown; the shipped model is 'unet'.")
    if cfg.norm not in _NORMS:
        raise ValueError(f"model.norm={cfg.norm!r} is unknown; use one of {sorted(_NORMS)}.")
    from monai.networks.nets import UNet

    if seed is not None:
        torch.manual_seed(seed)
    net = UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        num_res_units=cfg.num_res_units,
        norm=_NORMS[cfg.norm],
        act=("relu", {"inplace": False}),
        dropout=cfg.dropout,
    )
    net = ModuleValidator.fix(net)
    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible after fix-ups: {errors}")
    return net
