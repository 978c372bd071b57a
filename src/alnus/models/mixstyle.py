"""MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021) for training against site shift.

While training, with probability `p` per stage and batch, the feature maps after a backbone's early stages (its spec's
`style_layers`) keep their content but take on mixed "styles": each image's per-channel mean and standard deviation
are replaced by a convex mix of its own and those of another image of the batch, the weight drawn from
Beta(alpha, alpha). A scanner's gain, contrast and speckle texture live largely in these statistics, so the network
is pushed to classify across them. The hooks do nothing in eval mode, and a model's state dict is unchanged by them:
packages, prediction and the service never see MixStyle.
"""

from __future__ import annotations

import torch
from torch import nn

from alnus.models.registry import UltrasoundNet, get_submodule

EPS = 1e-6


def mix_styles(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """`x` (B, C, H, W) with each image's channel statistics mixed with those of image `perm[i]`, weight `lam[i]`.

    The statistics are detached, as in the paper: the mixing is a perturbation, not a path for gradients. They are
    computed in float32 whatever the autocast precision, and the result has `x`'s dtype."""
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True).detach()
    sig = (xf.var(dim=(2, 3), keepdim=True) + EPS).sqrt().detach()
    lam = lam.float().view(-1, 1, 1, 1)
    mixed = (xf - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]
    return mixed.to(x.dtype)


class MixStyle:
    """Forward hooks on a model's style layers, each mixing a training batch's styles with probability `p`
    (an independent draw per layer and batch, from torch's seeded generator); `remove()` takes them off.

    Attach it after any copy of the model is made (a moving or epoch average): a deep copy carries the hooks."""

    def __init__(self, model: UltrasoundNet, p: float, alpha: float = 0.1) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"MixStyle probability {p} must be in (0, 1]")
        if not model.spec.style_layers:
            raise ValueError(f"backbone {model.spec.name} names no style layers for MixStyle")
        self.p = p
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
        self.handles = [
            get_submodule(model.backbone, path).register_forward_hook(self._hook) for path in model.spec.style_layers
        ]

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        # A 1x1 map has no spatial variance to mix; a batch of one has no other image.
        if not module.training or out.ndim != 4 or out.shape[0] < 2 or out.shape[2] * out.shape[3] < 2:
            return None
        if not bool(torch.rand(()) < self.p):
            return None
        n = out.shape[0]
        lam = self.beta.sample((n,)).to(out.device)
        return mix_styles(out, lam, torch.randperm(n, device=out.device))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
