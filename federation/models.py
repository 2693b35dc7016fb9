"""The model factory shared by the coordinator and every site."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from federation.config import ModelConfig

__all__ = ["build_model", "norm_state_keys", "split_norm_state"]

_NORMS = {"instance": "instance", "group": "group", "batch": "batch"}
_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> nn.Module:
    """Build the configured network, made DP-ready.

    BatchNorm is swapped for GroupNorm and in-place activations are turned off, so
    Opacus can compute per-sample gradients; the coordinator and the sites call this
    same function, so state-dict keys always match.

    `unet` is MONAI's U-Net (2D or 3D, `spatial_dims`), `densenet` MONAI's DenseNet
    classifier (`block_config` (6, 12, 24, 16) with 64 initial features and growth 32 is
    DenseNet121).

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

    if cfg.name not in _BUILDERS:
        raise ValueError(
            f"model.name={cfg.name!r} is unknown; shipped models: {sorted(_BUILDERS)}."
        )
    if cfg.norm not in _NORMS:
        raise ValueError(f"model.norm={cfg.norm!r} is unknown; use one of {sorted(_NORMS)}.")
    if cfg.spatial_dims not in (2, 3):
        raise ValueError(f"model.spatial_dims={cfg.spatial_dims} must be 2 or 3.")
    if seed is not None:
        torch.manual_seed(seed)
    net = _BUILDERS[cfg.name](cfg)
    net = ModuleValidator.fix(net)
    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible after fix-ups: {errors}")
    return net


def _unet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        num_res_units=cfg.num_res_units,
        norm=(_NORMS[cfg.norm], {"affine": cfg.norm_affine}),
        act=("relu", {"inplace": False}),
        dropout=cfg.dropout,
    )


def _densenet(cfg: ModelConfig) -> nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        init_features=cfg.init_features,
        growth_rate=cfg.growth_rate,
        block_config=tuple(cfg.block_config),
        norm=(_NORMS[cfg.norm], {"affine": cfg.norm_affine}),
        act=("relu", {"inplace": False}),
        dropout_prob=cfg.dropout,
    )


# model.name -> builder; every network goes through the same DP fix-ups.
_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "unet": _unet,
    "densenet": _densenet,
}


def norm_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's normalisation layers (affine weights and statistics)."""
    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            found.update(prefix + k for k in module.state_dict())
    return frozenset(found)


def split_norm_state(
    state: dict[str, torch.Tensor], norm_keys: frozenset[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state dict into (shared, normalisation) parts."""
    shared = {k: v for k, v in state.items() if k not in norm_keys}
    local = {k: v for k, v in state.items() if k in norm_keys}
    return shared, local
