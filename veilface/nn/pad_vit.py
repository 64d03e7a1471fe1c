"""Prompted CLIP-style ViT for face presentation-attack detection (after SVLP-IL).

Shared by ``veilface.federated.pad`` (training) and ``veilface.client.liveness``
(the kiosk gate); torch only. Selective EWC and the Fisher code live in
:mod:`veilface.federated.pad.models`.

Layout (ideas from SVLP-IL, arXiv 2512.19022, and FA3-CLIP, arXiv 2504.00454;
our own code)::

    image (B, 3, H, W), normalised with CLIP_MEAN / CLIP_STD
      -> conv1 patches + class_embedding + positional_embedding   (B, 1 + N, C)
      -> insert prompts after the class token:
           universal prompts  (n_universal, C)   shared by every domain
           domain prompts[t]  (n_domain, C)      one set per domain, added as it arrives
      -> ln_pre -> transformer (CLIP residual attention blocks) -> ln_post(class token) @ proj
      -> head: Linear(output_dim, 1)   logit of "bona fide (live)"

Multi-Aspect Prompting (MAP)
    A universal prompt set carries cues shared by all domains; each domain
    ``t`` gets its own prompt set when it arrives (:meth:`PromptedPAD.add_domain`),
    trained only on that domain and frozen afterwards. At inference the domain
    is chosen per image by the **nearest domain key**: the key of domain ``t``
    is the mean and covariance of a capture descriptor of its training images
    (per-channel mean and log-std of the frozen tower's patch embedding),
    computed once after training on it (statistics, not data: the method
    stays rehearsal-free); an image uses the prompt set of the key nearest in
    Mahalanobis distance under the covariance pooled over the keys (linear
    discriminant analysis; on the proxy this routes 93-100 % of test images
    to their domain, against 70-100 % with per-domain diagonal variances).

CLIP weights load through :func:`veilface.nn.clip_weights.load_clip_visual`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from veilface.errors import CheckpointError, InvalidArgument
from veilface.nn.pad_domains import KEY_RIDGE, DomainRouted

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "KEY_RIDGE",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "CheckpointError",
    "PromptedPAD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of the CLIP-style ViT image tower.

    Attributes
    ----------
    image_size : int
        Input side in pixels (square); must be a multiple of ``patch_size``.
    patch_size : int
    width : int
        Token dimension ``C``.
    layers : int
        Number of residual attention blocks.
    heads : int
        Attention heads; ``width`` must be a multiple.
    output_dim : int
        Dimension of the projected image feature.
    quick_gelu : bool
        OpenAI CLIP uses ``x * sigmoid(1.702 x)``; open_clip's newer models plain GELU.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise InvalidArgument(
                f"image_size ({self.image_size}) must be a positive multiple of "
                f"patch_size ({self.patch_size})"
            )
        if self.width <= 0 or self.heads <= 0 or self.width % self.heads:
            raise InvalidArgument(
                f"width ({self.width}) must be a multiple of heads ({self.heads})"
            )
        if self.layers <= 0 or self.output_dim <= 0:
            raise InvalidArgument("layers and output_dim must be positive")

    @classmethod
    def vit_b16(cls) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-B/16 visual tower (load its weights with :func:`load_clip_visual`)."""
        return cls()

    @classmethod
    def tiny(cls) -> CLIPVisionConfig:
        """A random-init toy of the same code, for tests: 32 px, 2 blocks of width 32."""
        return cls(image_size=32, patch_size=8, width=32, layers=2, heads=2, output_dim=32)

    @classmethod
    def small(cls) -> CLIPVisionConfig:
        """The proxy benchmark's size: 48 px, patch 8, 3 blocks of width 64 (CPU-friendly)."""
        return cls(image_size=48, patch_size=8, width=64, layers=3, heads=4, output_dim=64)

    @classmethod
    def kiosk(cls) -> CLIPVisionConfig:
        """The client's liveness model: 64 px (a face and its surround), patch 8, 4 blocks of
        width 64: ~0.3 M weights at inference, a few ms per face on one core."""
        return cls(image_size=64, patch_size=8, width=64, layers=4, heads=4, output_dim=64)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm block; parameter names match ``transformer.resblocks.N.*``."""

    def __init__(self, width: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", _QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        out: Tensor = x + self.mlp(self.ln_2(x))
        return out


class _Transformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(
            *(
                _ResidualAttentionBlock(config.width, config.heads, config.quick_gelu)
                for _ in range(config.layers)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.resblocks(x)
        return out


class CLIPVisionTransformer(nn.Module):
    """CLIP ViT image tower (our definition; OpenAI/open_clip key names).

    Parameters
    ----------
    config : CLIPVisionConfig
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config.width
        scale = c**-0.5
        self.conv1 = nn.Conv2d(3, c, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(c))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid**2 + 1, c))
        self.ln_pre = nn.LayerNorm(c)
        self.transformer = _Transformer(config)
        self.ln_post = nn.LayerNorm(c)
        self.proj = nn.Parameter(scale * torch.randn(c, config.output_dim))

    def embed(self, x: Tensor) -> Tensor:
        """Patch + class tokens with positions: ``(B, 3, H, W)`` -> ``(B, 1 + N, C)``."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (self.config.image_size,) * 2:
            raise InvalidArgument(
                f"images must be (B, 3, {self.config.image_size}, {self.config.image_size}), "
                f"got {tuple(x.shape)}"
            )
        p = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(p.dtype).expand(p.shape[0], 1, -1)
        return torch.cat([cls, p], dim=1) + self.positional_embedding.to(p.dtype)

    def encode_tokens(self, tokens: Tensor, deep_prompts: Tensor | None = None) -> Tensor:
        """Run ln_pre, the blocks and the head on ``(B, T, C)`` tokens -> ``(B, output_dim)``.

        ``deep_prompts`` ``(B, layers - 1, P, C)``, if given, replaces tokens
        ``1 .. P`` before every block after the first (deep prompting).
        """
        h = self.ln_pre(tokens)
        for i, block in enumerate(self.transformer.resblocks):
            if deep_prompts is not None and i > 0:
                p = deep_prompts[:, i - 1]
                h = torch.cat([h[:, :1], p.to(h.dtype), h[:, 1 + p.shape[1] :]], dim=1)
            h = block(h)
        out: Tensor = self.ln_post(h[:, 0]) @ self.proj
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Image features ``(B, output_dim)`` float32 (no prompts)."""
        return self.encode_tokens(self.embed(x))




class PromptedPAD(DomainRouted):
    """CLIP-style ViT with universal + per-domain prompts and a live/spoof head.

    Parameters
    ----------
    config : CLIPVisionConfig
    n_universal, n_domain : int, keyword-only
        Prompt tokens in the universal set and in each domain set; ``0`` and
        ``0`` give the plain (prompt-free) model used by the naive baseline.

    Notes
    -----
    The state dict holds ``domain_prompts.<t>`` and ``domain_keys.<t>`` for
    each added domain; :meth:`ensure_domains` grows a model to match a state
    dict with more domains before loading it.
    """

    def __init__(
        self, config: CLIPVisionConfig, *, n_universal: int = 4, n_domain: int = 4
    ) -> None:
        super().__init__()
        if n_universal < 0 or n_domain < 0:
            raise InvalidArgument("prompt lengths must be >= 0")
        self.config = config
        self.n_universal = n_universal
        self.n_domain = n_domain
        self.backbone = CLIPVisionTransformer(config)
        # frozen copy of the initial (pretrained) tower: the query function for domain keys
        self.query: CLIPVisionTransformer | None = None
        if n_universal + n_domain > 0:
            self.query = CLIPVisionTransformer(config)
            self.query.load_state_dict(self.backbone.state_dict())
            self.query.requires_grad_(False)
        # prompts for the input and for every later block (deep prompting): (layers, n, C)
        self.universal_prompts = nn.Parameter(
            0.02 * torch.randn(config.layers, n_universal, config.width)
        )
        self.domain_prompts = nn.ParameterList()
        self.domain_heads = nn.ParameterList()
        self.domain_keys = nn.ParameterList()
        self.head = nn.Linear(config.output_dim, 1)

    @property
    def model_id(self) -> str:
        """Identifies the architecture for checkpoint checks (not the number of domains)."""
        c = self.config
        return (
            f"veilface-pad-vit:i{c.image_size}-p{c.patch_size}-w{c.width}-l{c.layers}-"
            f"h{c.heads}-o{c.output_dim}-u{self.n_universal}-d{self.n_domain}-kcov"
        )

    @property
    def prompted(self) -> bool:
        """Whether any prompt tokens are used (False for the naive baseline)."""
        return self.n_universal + self.n_domain > 0

    def add_domain(self) -> int:
        """Add a prompt set (initialised from the mean of the earlier ones) and a zero key.

        Returns
        -------
        int
            The new domain index.
        """
        if self.num_domains:
            init = torch.stack([p.detach() for p in self.domain_prompts]).mean(0).clone()
        else:
            init = 0.02 * torch.randn(self.config.layers, self.n_domain, self.config.width)
        self.domain_prompts.append(nn.Parameter(init))
        self.domain_heads.append(nn.Parameter(torch.zeros(self.config.output_dim + 1)))
        self.domain_keys.append(self._new_key())
        return self.num_domains - 1

    @property
    def key_dim(self) -> int:
        """Length of the query descriptor: mean and log-std of each patch-embedding channel."""
        return 2 * self.config.width

    def features(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Image features ``(B, output_dim)``, with the prompts of ``domain`` when prompted.

        ``domain`` may be an int (all images), a ``(B,)`` int64 tensor (per image),
        or ``None`` (prompt-free features, used for domain keys).
        """
        tokens = self.backbone.embed(x)
        if domain is None or not self.prompted:
            return self.backbone.encode_tokens(tokens)
        b = tokens.shape[0]
        if isinstance(domain, int):
            if not 0 <= domain < self.num_domains:
                raise InvalidArgument(f"domain {domain} not added (have {self.num_domains})")
            dom = self.domain_prompts[domain].expand(b, -1, -1, -1)
        else:
            stacked = torch.stack(list(self.domain_prompts))  # (T, n_domain, C)
            dom = stacked[domain]
        uni = self.universal_prompts.expand(b, -1, -1, -1)
        prompts = torch.cat([uni, dom], dim=2).to(tokens.dtype)  # (B, layers, P, C)
        seq = torch.cat([tokens[:, :1], prompts[:, 0], tokens[:, 1:]], 1)
        return self.backbone.encode_tokens(seq, prompts[:, 1:])

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Live logit ``(B,)`` float32 (higher = more likely bona fide).

        Prompted models add the domain's residual head ``w_t . f + b_t`` to the
        shared head.
        """
        feat = self.features(x, domain)
        out: Tensor = self.head(feat).squeeze(1)
        return self._domain_logit(out, feat, domain)

    def load_backbone(self, path: str | Path) -> int:
        """Load CLIP visual weights (see :func:`load_clip_visual`) into backbone and query."""
        from veilface.nn.clip_weights import load_clip_visual

        count = load_clip_visual(self.backbone, path)
        if self.query is not None:
            self.query.load_state_dict(self.backbone.state_dict())
        return count

    @torch.no_grad()
    def query_descriptor(self, x: Tensor) -> Tensor:
        """Capture descriptor ``(B, key_dim)``: mean and log-std over patches of the frozen
        query tower's patch embedding (``conv1``), one pair per channel."""
        tower = self.query if self.query is not None else self.backbone
        t = tower.conv1(x).flatten(2)  # (B, C, N)
        return torch.cat([t.mean(2), t.std(2).clamp_min(1e-6).log()], dim=1)

