"""The kiosk's liveness model: a truncated ImageNet MobileNetV2 with universal and per-domain adapters.

Layout::

    crop (B, 3, S, S), normalised with CLIP_MEAN / CLIP_STD
      -> MobileNetV2 features.0 .. features.{depth-1}   (ImageNet-initialised)
           after each block in ``adapt_at``: FiLM  x * (1 + g) + b
             universal adapter  (shared by every domain)
             domain adapter[t]  (one set per domain, added as it arrives)
      -> global average pool -> head: Linear(C, 1) + domain t's residual head

It follows the same incremental recipe as the prompted ViT
(:class:`~veilface.nn.pad_vit.PromptedPAD`, after SVLP-IL), with
feature-wise adapters in place of prompt tokens: only the current domain's
adapter and residual head train, earlier ones are frozen; an image is routed
to the domain whose key (mean and covariance of the frozen stem's per-channel
statistics) is nearest (:class:`~veilface.nn.pad_domains.DomainRouted`).
Batch-norm statistics stay those of ImageNet (:class:`FrozenBatchNorm2d`;
their affine weights train), so federated averaging and later domains
never move them.

Why a CNN for the kiosk: on the rendered proxy a 0.3 M-weight ViT trained
from scratch across four sequential domains reached a validation APCER of
9 % at BPCER 5 %; this network, starting from ImageNet features, learns the
print and replay cues (sheet edges, bezels, halftone, moiré) from a few
hundred images per site (docs/federated.md, "The kiosk liveness model").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.errors import InvalidArgument
from veilface.nn.mobilenet import MobileNetV2, flatten_torchvision_keys
from veilface.nn.pad_domains import DomainRouted

__all__ = ["AdaptedCNNPAD", "CNNConfig", "FrozenBatchNorm2d"]


class CNNConfig:
    """Shape of the adapted CNN: input side, MobileNetV2 depth, where adapters sit."""

    def __init__(
        self, *, image_size: int = 64, depth: int = 14, adapt_at: Sequence[int] = (6, 10)
    ) -> None:
        if not 2 <= depth <= 18:
            raise InvalidArgument(f"depth must be in [2, 18], got {depth}")
        if not 32 <= image_size <= 256:
            raise InvalidArgument(f"image_size must be in [32, 256], got {image_size}")
        if any(not 0 <= a < depth for a in adapt_at) or len(set(adapt_at)) != len(adapt_at):
            raise InvalidArgument(f"adapter positions {list(adapt_at)} must be distinct blocks < {depth}")
        self.image_size = int(image_size)
        self.depth = int(depth)
        self.adapt_at = tuple(sorted(int(a) for a in adapt_at))

    def to_json(self) -> dict[str, object]:
        return {"image_size": self.image_size, "depth": self.depth, "adapt_at": list(self.adapt_at)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CNNConfig) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash((self.image_size, self.depth, self.adapt_at))


class FrozenBatchNorm2d(nn.Module):
    """Batch norm on stored statistics only (ImageNet's); its affine weights still train.

    Same parameter and buffer names as :class:`torch.nn.BatchNorm2d`, without
    the step counter, so ImageNet weight files load into it and federated
    averaging never moves the statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        mean, var = self.get_buffer("running_mean"), self.get_buffer("running_var")
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _freeze_batch_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, child.eps))
        else:
            _freeze_batch_norm(child)


def _channels(block: nn.Module) -> int:
    bns = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    return int(bns[-1].num_features)


class AdaptedCNNPAD(DomainRouted):
    """Truncated MobileNetV2 with universal + per-domain FiLM adapters and a live/spoof head.

    Parameters
    ----------
    config : CNNConfig
    adapters : bool, keyword-only
        ``False`` gives the plain network (the naive baseline): no adapters,
        no domain heads, no routing.
    """

    def __init__(self, config: CNNConfig, *, adapters: bool = True) -> None:
        super().__init__()
        self.config = config
        self.adapters = adapters
        full = MobileNetV2()
        self.backbone = nn.Sequential(*list(full.features.children())[: config.depth])
        _freeze_batch_norm(self.backbone)
        self._adapt_channels = [_channels(self.backbone[i]) for i in config.adapt_at]
        self.output_dim = _channels(self.backbone[config.depth - 1])
        self.film_dim = 2 * sum(self._adapt_channels)
        # frozen copy of the initial stem: the capture descriptor of the domain keys
        self.query = copy.deepcopy(self.backbone[0])
        self.query.requires_grad_(False)
        self.universal_prompts = nn.Parameter(torch.zeros(self.film_dim if adapters else 0))
        self.domain_prompts = nn.ParameterList()
        self.domain_heads = nn.ParameterList()
        self.domain_keys = nn.ParameterList()
        self.head = nn.Linear(self.output_dim, 1)

    @property
    def model_id(self) -> str:
        c = self.config
        at = "-".join(str(a) for a in c.adapt_at)
        return f"veilface-pad-mnv2:i{c.image_size}-d{c.depth}-a{at}-f{int(self.adapters)}-kcov"

    @property
    def prompted(self) -> bool:
        return self.adapters

    @property
    def key_dim(self) -> int:
        """Mean and log-std of each stem channel."""
        return 2 * _channels(self.query)

    def add_domain(self) -> int:
        """Add an adapter set (the mean of the earlier ones, or zero) and a zero residual head."""
        if self.num_domains:
            init = torch.stack([p.detach() for p in self.domain_prompts]).mean(0).clone()
        else:
            init = torch.zeros(self.film_dim)
        self.domain_prompts.append(nn.Parameter(init))
        self.domain_heads.append(nn.Parameter(torch.zeros(self.output_dim + 1)))
        self.domain_keys.append(self._new_key())
        return self.num_domains - 1

    def _films(self, domain: Tensor | int | None, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per adapted block: (gain, bias), each ``(B, C)`` (universal + the domain's)."""
        if not self.adapters:
            return []
        vec = self.universal_prompts.expand(batch, -1)
        if domain is not None and self.num_domains:
            if isinstance(domain, int):
                if not 0 <= domain < self.num_domains:
                    raise InvalidArgument(f"domain {domain} not added (have {self.num_domains})")
                vec = vec + self.domain_prompts[domain].expand(batch, -1)
            else:
                vec = vec + torch.stack(list(self.domain_prompts))[domain]
        out, k = [], 0
        for c in self._adapt_channels:
            out.append((vec[:, k : k + c], vec[:, k + c : k + 2 * c]))
            k += 2 * c
        return out

    def features(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Pooled features ``(B, output_dim)``, with the adapters of ``domain`` (None: universal only)."""
        films = self._films(domain, x.shape[0])
        j = 0
        for i, block in enumerate(self.backbone):
            x = block(x)
            if films and i in self.config.adapt_at:
                g, b = films[j]
                x = x * (1.0 + g[:, :, None, None]) + b[:, :, None, None]
                j += 1
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Live logit ``(B,)`` (higher = more likely bona fide)."""
        feat = self.features(x, domain)
        out: Tensor = self.head(feat).squeeze(1)
        return self._domain_logit(out, feat, domain)

    @torch.no_grad()
    def query_descriptor(self, x: Tensor) -> Tensor:
        """Capture descriptor ``(B, key_dim)``: per-channel mean and log-std of the frozen stem."""
        self.query.eval()
        t = self.query(x).flatten(2)
        return torch.cat([t.mean(2), t.std(2).clamp_min(1e-6).log()], dim=1)

    def load_backbone(self, path: str | Path) -> int:
        """Load ImageNet MobileNetV2 weights (``features.*``) into the backbone and the query stem."""
        from veilface.errors import CheckpointError

        try:
            raw = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for foreign files
            raise CheckpointError(f"{path} is not a readable torch state dict") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        ref = MobileNetV2()
        flat = flatten_torchvision_keys({k: v for k, v in raw.items() if k.startswith("features.")}, ref)
        mine = {
            f"backbone.{k.removeprefix('features.')}": v
            for k, v in flat.items()
            if int(k.split(".")[1]) < self.config.depth and not k.endswith("num_batches_tracked")
        }
        state = self.state_dict()
        wrong = [k for k, v in mine.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
        if wrong or len(mine) == 0:
            raise CheckpointError(f"{path} does not fit MobileNetV2 features (e.g. {wrong[:2]})")
        self.load_state_dict(mine, strict=False)
        self.query.load_state_dict(self.backbone[0].state_dict())
        return len(mine)
