"""The model factory shared by the coordinator and every site."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from federation.config import ModelConfig

__all__ = [
    "build_model",
    "frozen_names",
    "norm_state_keys",
    "split_norm_state",
    "weights_sha256",
]

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
    net = _not_inplace(_BUILDERS[cfg.name](cfg))
    if ModuleValidator.validate(net, strict=False):
        # Opacus swaps what it cannot handle (batch norm, ...) on a deep copy of the net.
        net = _not_inplace(ModuleValidator.fix(net))
        errors = ModuleValidator.validate(net, strict=False)
        if errors:
            raise ValueError(f"model is not DP-compatible after fix-ups: {errors}")
    frozen = frozen_names(net, cfg)
    for name, param in net.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return net


def _not_inplace(net: nn.Module) -> nn.Module:
    """Turn off in-place activations, whose writes break Opacus's backward hooks."""
    for module in net.modules():
        if hasattr(module, "inplace"):
            cast(Any, module).inplace = False
    return net


def frozen_names(net: nn.Module, cfg: ModelConfig) -> frozenset[str]:
    """Parameters `model.freeze` names: prefixes (`model.0`), globs (`*.adn.*`), `encoder`.

    Frozen parameters get no gradient, so DP-SGD computes no per-sample gradients for them.

    Raises:
        ValueError: A pattern matches no parameter (the network's top-level parts named).
    """
    names = [n for n, _ in net.named_parameters()]
    found: set[str] = set()
    for pattern in cfg.freeze:
        prefixes = _encoder(net, cfg) if pattern == "encoder" else [pattern]
        matched = {
            n
            for n in names
            for p in prefixes
            if n == p or n.startswith(p + ".") or fnmatch.fnmatchcase(n, p)
        }
        if not matched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"model.freeze entry {pattern!r} matches no parameter of model.name="
                f"{cfg.name!r}; use `encoder`, a parameter-name prefix such as "
                f"{names[0].rsplit('.', 1)[0]!r}, or a glob (top-level parts: {tops})."
            )
        found |= matched
    return frozenset(found)


def _encoder(net: nn.Module, cfg: ModelConfig) -> list[str]:
    """Module prefixes of the encoder: U-Net down path and bottom, DenseNet features."""
    if cfg.name == "densenet":
        return ["features"]
    prefix, block = "model", net.model
    parts = []
    while isinstance(block, nn.Sequential):  # MONAI U-Net: (down, skip(inner), up)
        parts.append(f"{prefix}.0")
        prefix, block = f"{prefix}.1.submodule", block[1].submodule
    return [*parts, prefix]


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


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict: names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
