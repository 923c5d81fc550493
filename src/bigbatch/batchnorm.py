"""BatchNorm under gradient accumulation: convert or freeze it (pooling: :mod:`bigbatch.pooled`).

BatchNorm is not a sum over items. In training mode each forward normalizes with the statistics of
the batch it is given and moves the running statistics one momentum step towards them; under
accumulation that batch is a micro-batch. :func:`convert_batchnorm` removes the dependence on the
batch: GroupNorm normalizes each sample over groups of its own channels, and a frozen BatchNorm
normalizes with its fixed running statistics (eval mode). Either way one sample's output no longer
depends on the other samples of its micro-batch, so accumulation is exact again — for a different
model than the BatchNorm one (a GroupNorm model is trained from scratch; freezing is for fine-tuning
a model whose running statistics are already good).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BigBatchError

__all__ = ["FrozenBatchNorm", "batchnorm_layers", "convert_batchnorm", "group_count"]

ConvertTo = Literal["group", "layer", "freeze"]


def batchnorm_layers(model: torch.nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d/Sync/Lazy: subclasses of ``_BatchNorm``) with its name."""
    return [(name or type(m).__name__, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm)]


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of it that is at most 32 and leaves
    at least 2 channels per group (32 groups as in Wu & He, 2018, when the width allows; a group of
    one channel would be InstanceNorm). 1 when the width is below 4 or a prime."""
    for groups in range(min(32, channels // 2), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


class FrozenBatchNorm(torch.nn.Module):
    """BatchNorm that always normalizes with its running statistics, as in eval mode.

    ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias`` per channel (dimension 1),
    whatever ``train()``/``eval()`` says; the running statistics never change and ``weight`` and
    ``bias`` stay trainable. The state-dict keys are BatchNorm's, so BatchNorm checkpoints load.

    Args:
        num_features: channels ``C`` of an input ``(N, C, *)``.
        eps: added to the variance.
        affine: learn ``weight`` and ``bias``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm expects input (N, {self.num_features}, *), got "
                             f"shape {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def convert_batchnorm(model: torch.nn.Module, to: ConvertTo = "group", *,
                      groups: int | None = None) -> torch.nn.Module:
    """Replace every BatchNorm layer of ``model`` (in place) by a per-sample normalization.

    Args:
        model: the module; its BatchNorm children are replaced in place.
        to: ``"group"``: ``GroupNorm(group_count(C), C)``, normalizing each sample over groups of
            its channels (and all positions); ``"layer"``: ``GroupNorm(1, C)``, LayerNorm-style
            over all of a sample's channels and positions; ``"freeze"``: :class:`FrozenBatchNorm`
            with the layer's running statistics. ``eps`` and the affine ``weight``/``bias`` (values
            and ``requires_grad``) are carried over, on the layer's device and dtype; GroupNorm
            drops the running statistics.
        groups: with ``to="group"``, the group count to use instead (it must divide every
            converted layer's channels).

    Returns:
        ``model`` (a new module only when ``model`` itself is a BatchNorm layer). A layer shared at
        several places stays shared.

    Raises:
        BigBatchError: unknown ``to``; ``groups`` does not divide a layer's channels; freezing a
            layer that keeps no running statistics; a lazy layer not yet initialized.
    """
    if to not in ("group", "layer", "freeze"):
        raise BigBatchError(f"convert_batchnorm(to={to!r}): use 'group', 'layer' or 'freeze'")
    if isinstance(model, _BatchNorm):
        return _replacement(model, type(model).__name__, to, groups)
    done: dict[int, torch.nn.Module] = {}
    for where, child in list(model.named_modules(remove_duplicate=False)):
        if isinstance(child, _BatchNorm):
            if id(child) not in done:
                done[id(child)] = _replacement(child, where, to, groups)
            parent, _, name = where.rpartition(".")
            setattr(model.get_submodule(parent), name, done[id(child)])
    return model


def _replacement(bn: _BatchNorm, name: str, to: ConvertTo, groups: int | None) -> torch.nn.Module:
    if isinstance(bn, torch.nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise BigBatchError(f"BatchNorm layer {name} is lazy and not yet initialized; run one "
                            "forward pass before converting it")
    channels = bn.num_features
    like = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new: torch.nn.Module
    if to == "freeze":
        if bn.running_mean is None or bn.running_var is None:
            raise BigBatchError(
                f"cannot freeze BatchNorm layer {name}: it keeps no running statistics "
                "(track_running_stats=False); convert it with to='group' instead")
        new = FrozenBatchNorm(channels, bn.eps, bn.affine, **kw)
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
    else:
        g = 1 if to == "layer" else groups if groups is not None else group_count(channels)
        if g <= 0 or channels % g:
            raise BigBatchError(f"convert_batchnorm(groups={g}): BatchNorm layer {name} has "
                                f"{channels} channels, which {g} does not divide; pass a divisor "
                                "of every layer's channels, or groups=None to choose per layer")
        new = torch.nn.GroupNorm(g, channels, eps=bn.eps, affine=bn.affine, **kw)
    if bn.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    return new.train(bn.training)
