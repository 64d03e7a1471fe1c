"""Prompted CLIP-style ViT for incremental face PAD, with Selective EWC (after SVLP-IL).

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

Selective EWC (:class:`SelectiveEWC`)
    After each domain the diagonal (empirical) Fisher information of the
    shared weights (backbone, universal prompts, head) is computed on that
    domain's training data and accumulated over domains; the quadratic
    penalty ``lambda/2 * sum(mask * F * (theta - theta*)^2)`` anchors
    ``theta*`` (the weights after the last domain) and is restricted by
    ``mask`` to the top-``p`` fraction of weights by accumulated Fisher (one
    global threshold over all shared weights).

Weight formats accepted by :func:`load_clip_visual`
    - a plain visual-tower state dict with OpenAI CLIP key names
      (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
      ``ln_pre.*``, ``transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}.*``,
      ``ln_post.*``, ``proj``);
    - a full CLIP state dict (text tower ignored) with those keys under
      ``visual.``, e.g. ``torch.jit.load("ViT-B-16.pt").state_dict()`` saved
      with ``torch.save`` (OpenAI JIT archives themselves are not read: they
      hold code);
    - an open_clip checkpoint (``{"state_dict": {...}}``, keys optionally
      prefixed ``module.``) of a ``ViT-*`` model, whose visual keys are the same.
    A positional embedding for another grid size is resized bicubically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veilface.errors import CheckpointError, InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "KEY_RIDGE",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "CheckpointError",
    "PromptedPAD",
    "SelectiveEWC",
    "compute_fisher",
    "load_clip_visual",
    "numpy_to_state",
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


def _strip_visual_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    has_visual = any(k.removeprefix("module.").startswith("visual.") for k in state)
    for key, value in state.items():
        k = key.removeprefix("module.")
        if has_visual:
            if not k.startswith("visual."):
                continue  # text tower, logit_scale, ...
            k = k.removeprefix("visual.")
        out[k] = value
    return out


def load_clip_visual(model: CLIPVisionTransformer, path: str | Path) -> int:
    """Load CLIP visual-tower weights from a user-given file (formats: module docstring).

    Parameters
    ----------
    model : CLIPVisionTransformer
        Its config must match the checkpoint's (width, layers, patch size,
        output_dim); only the image size may differ (positions are resized).
    path : str or pathlib.Path
        A ``torch.save`` file, read with ``weights_only=True``.

    Returns
    -------
    int
        Number of tensors copied.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, or keys/shapes of another model.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(
            f"no CLIP weights file at {file}; pass the path of a saved state dict"
        )
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        raise CheckpointError(
            f"{file} is not a readable torch state dict ({type(exc).__name__}); an OpenAI JIT "
            "archive must be converted: torch.save(torch.jit.load(p).state_dict(), out)"
        ) from exc
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict of named tensors")
    state = _strip_visual_prefix(raw)
    expected = model.state_dict()
    pos_key = "positional_embedding"
    if pos_key in state and state[pos_key].shape != expected[pos_key].shape:
        state[pos_key] = _resize_positions(state[pos_key], model.config.grid)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"{file} is not a CLIP visual tower for {asdict(model.config)}: a checkpoint from "
            f"another model? {'; '.join(parts)}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    logger.info("loaded %d CLIP visual tensors from %s", len(state), file)
    return len(state)


def _resize_positions(pos: Tensor, grid: int) -> Tensor:
    n = pos.shape[0] - 1
    old = round(math.sqrt(n))
    if pos.ndim != 2 or old * old != n:
        raise CheckpointError(
            f"positional_embedding of shape {tuple(pos.shape)} is not a square grid"
        )
    cls, grid_pos = pos[:1], pos[1:]
    g = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls.float(), g.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


KEY_RIDGE = 1e-3
"""Ridge added to the pooled key covariance, relative to its mean variance."""


class PromptedPAD(nn.Module):
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
    def num_domains(self) -> int:
        """Domains added so far."""
        return len(self.domain_prompts)

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
        # key = (1 + D, D): row 0 the descriptor mean, rows 1.. its covariance;
        # a zero covariance = "key not set yet" (the domain is not consolidated)
        self.domain_keys.append(
            nn.Parameter(torch.zeros(1 + self.key_dim, self.key_dim), requires_grad=False)
        )
        return self.num_domains - 1

    @property
    def key_dim(self) -> int:
        """Length of the query descriptor: mean and log-std of each patch-embedding channel."""
        return 2 * self.config.width

    def ensure_domains(self, count: int) -> None:
        """Add domains until there are ``count``."""
        while self.num_domains < count:
            self.add_domain()

    def shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Weights shared by all domains (what Selective EWC protects)."""
        for name, p in self.named_parameters():
            if not name.startswith(("domain_", "query.")):
                yield name, p

    def set_trainable(self, domain: int | None) -> None:
        """Train the shared weights and, if given, domain ``domain``'s prompts; freeze the rest."""
        for name, p in self.named_parameters():
            if name.startswith(("domain_keys.", "query.")):
                p.requires_grad_(False)
            elif name.startswith(("domain_prompts.", "domain_heads.")):
                p.requires_grad_(domain is not None and name.endswith(f".{domain}"))
            else:
                p.requires_grad_(True)

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
        if domain is None or not self.prompted:
            return out
        if isinstance(domain, int):
            dh = self.domain_heads[domain].expand(feat.shape[0], -1)
        else:
            dh = torch.stack(list(self.domain_heads))[domain]
        logit: Tensor = out + (feat * dh[:, :-1]).sum(1) + dh[:, -1]
        return logit

    def load_backbone(self, path: str | Path) -> int:
        """Load CLIP visual weights (see :func:`load_clip_visual`) into backbone and query."""
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

    @torch.no_grad()
    def select_domains(self, x: Tensor) -> Tensor:
        """Most likely domain per image: ``(B, 3, H, W)`` -> ``(B,)`` int64.

        Each domain key is the mean and covariance of :meth:`query_descriptor`
        over the domain's training images. An image goes to the key nearest
        in Mahalanobis distance under the covariance pooled (averaged) over
        the consolidated domains, with a small ridge (``KEY_RIDGE`` times the
        mean variance): linear discriminant analysis with equal priors.
        Domains whose key is not set yet are skipped.
        """
        if self.num_domains == 0:
            raise InvalidArgument("no domain added yet: train on a domain first")
        f = self.query_descriptor(x).double()
        keys = torch.stack(list(self.domain_keys)).double()  # (T, 1 + D, D)
        covs = keys[:, 1:]
        is_set = covs.diagonal(dim1=1, dim2=2).sum(1) > 0
        if not bool(is_set.any()):  # nothing consolidated yet: the first domain
            return torch.zeros(x.shape[0], dtype=torch.int64)
        pooled = covs[is_set].mean(0)
        ridge = KEY_RIDGE * float(pooled.diagonal().mean().clamp_min(1e-12))
        pooled = pooled + ridge * torch.eye(pooled.shape[0], dtype=pooled.dtype)
        chol = torch.linalg.cholesky(pooled)
        diff = f[:, None, :] - keys[None, :, 0, :]  # (B, T, D)
        white = torch.linalg.solve_triangular(
            chol, diff.reshape(-1, diff.shape[2]).T, upper=False
        )  # (D, B*T)
        dist = (white**2).sum(0).reshape(diff.shape[0], diff.shape[1])
        dist[:, ~is_set] = torch.inf  # a domain still being trained has no key yet
        chosen: Tensor = dist.argmin(1)
        return chosen

    @torch.no_grad()
    def set_domain_key(self, domain: int, mean: Tensor, cov: Tensor) -> None:
        """Store domain ``domain``'s descriptor mean ``(key_dim,)`` and covariance
        ``(key_dim, key_dim)`` (symmetrised; its diagonal floored at 1e-6)."""
        d = self.key_dim
        if tuple(mean.shape) != (d,) or tuple(cov.shape) != (d, d):
            raise InvalidArgument(
                f"a domain key needs mean ({d},) and covariance ({d}, {d}), got "
                f"{tuple(mean.shape)} and {tuple(cov.shape)}"
            )
        cov = 0.5 * (cov + cov.T)
        cov = cov + torch.diag((1e-6 - cov.diagonal()).clamp_min(0.0))
        self.domain_keys[domain].copy_(torch.cat([mean[None], cov]).to(torch.float32))

    @torch.no_grad()
    def domain_key_sums(self, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Sums of the descriptor ``(key_dim,)`` and of its outer products ``(key_dim, key_dim)``.

        Sums (not means) so that sites can add them up: with ``n`` images in
        total, ``mean = s1 / n`` and ``cov = s2 / n - outer(mean, mean)``.
        """
        s1 = torch.zeros(self.key_dim, dtype=torch.float64)
        s2 = torch.zeros(self.key_dim, self.key_dim, dtype=torch.float64)
        for i in range(0, x.shape[0], batch_size):
            f = self.query_descriptor(x[i : i + batch_size]).double()
            s1 += f.sum(0)
            s2 += f.T @ f
        return s1.float(), s2.float()

    @torch.no_grad()
    def score(self, x: Tensor, batch_size: int = 128) -> Tensor:
        """P(live) ``(B,)``; prompted models pick each image's domain by nearest key."""
        outs = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            dom = self.select_domains(xb) if self.prompted else None
            outs.append(torch.sigmoid(self(xb, dom)))
        return torch.cat(outs) if outs else torch.zeros(0)


def compute_fisher(
    model: PromptedPAD,
    x: Tensor,
    y: Tensor,
    domain: int | None,
    *,
    batch_size: int = 8,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the shared weights on one domain's data.

    ``F = mean over mini-batches of (d loss_batch / d theta)^2 * batch_size``
    with the binary cross-entropy of the true labels (mini-batches of
    ``batch_size`` approximate per-sample gradients).

    Parameters
    ----------
    model : PromptedPAD
    x : Tensor
        ``(N, 3, H, W)`` float32 normalised images.
    y : Tensor
        ``(N,)`` float32, 1 = live.
    domain : int or None
        Prompt set used in the forward pass (``None`` for the naive model).

    Returns
    -------
    dict[str, Tensor]
        Parameter name -> Fisher tensor of its shape (float32, >= 0).
    """
    names = [n for n, _ in model.shared_parameters()]
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    was_training = model.training
    model.eval()
    batches = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        loss = F.binary_cross_entropy_with_logits(model(xb, domain), yb)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach() ** 2 * xb.shape[0]
        batches += 1
    model.train(was_training)
    return {n: f / max(batches, 1) for n, f in fisher.items()}


class SelectiveEWC:
    """Fisher penalty restricted to the top-``p`` most important shared weights.

    Parameters
    ----------
    fisher : Mapping[str, Tensor]
        Accumulated diagonal Fisher per parameter name.
    anchor : Mapping[str, Tensor]
        Weights ``theta*`` after the last consolidated domain (same names, shapes).
    top_p : float
        Fraction in ``(0, 1]`` of weights (over all names together) the penalty covers.
    """

    def __init__(
        self, fisher: Mapping[str, Tensor], anchor: Mapping[str, Tensor], *, top_p: float
    ) -> None:
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if set(fisher) != set(anchor):
            raise InvalidArgument("fisher and anchor must name the same parameters")
        for k in fisher:
            if fisher[k].shape != anchor[k].shape:
                raise InvalidArgument(f"fisher and anchor shapes differ for {k}")
        self.top_p = top_p
        self.fisher = {k: v.detach().float().clone() for k, v in fisher.items()}
        self.anchor = {k: v.detach().float().clone() for k, v in anchor.items()}
        flat = torch.cat([v.flatten() for v in self.fisher.values()]) if self.fisher else None
        if flat is None or flat.numel() == 0:
            self.mask: dict[str, Tensor] = {}
            return
        keep = max(1, round(top_p * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=True).values[-1]
        self.mask = {k: (v >= threshold) & (v > 0) for k, v in self.fisher.items()}
        # scale so the masked Fisher averages 1: lambda does not depend on loss scale
        masked = torch.cat([v[self.mask[k]] for k, v in self.fisher.items()])
        if masked.numel() and float(masked.mean()) > 0:
            scale = float(masked.mean())
            self.fisher = {k: v / scale for k, v in self.fisher.items()}

    @property
    def num_masked(self) -> int:
        """Weights the penalty covers."""
        return int(sum(int(m.sum()) for m in self.mask.values()))

    def penalty(self, model: nn.Module) -> Tensor:
        """``0.5 * sum(mask * F * (theta - theta*)^2)`` (scalar; multiply by lambda)."""
        params = dict(model.named_parameters())
        total = torch.zeros(())
        for k, m in self.mask.items():
            p = params[k]
            total = total + (self.fisher[k] * m * (p - self.anchor[k]) ** 2).sum()
        return 0.5 * total

    def to_numpy(self) -> dict[str, npt.NDArray[np.float32]]:
        """``fisher.<name>`` and ``anchor.<name>`` arrays for an ArrayRecord (masked Fisher)."""
        out: dict[str, npt.NDArray[np.float32]] = {}
        for k in self.fisher:
            out[f"fisher.{k}"] = (self.fisher[k] * self.mask[k]).numpy().astype(np.float32)
            out[f"anchor.{k}"] = self.anchor[k].numpy().astype(np.float32)
        return out

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, npt.NDArray[np.float32]]) -> SelectiveEWC | None:
        """Rebuild from :meth:`to_numpy` output (Fisher already masked; ``None`` if empty)."""
        names = [k.removeprefix("fisher.") for k in arrays if k.startswith("fisher.")]
        if not names:
            return None
        fisher = {n: torch.from_numpy(np.array(arrays[f"fisher.{n}"])) for n in names}
        anchor = {n: torch.from_numpy(np.array(arrays[f"anchor.{n}"])) for n in names}
        ewc = cls.__new__(cls)
        ewc.top_p = float("nan")
        ewc.fisher = {k: v.float() for k, v in fisher.items()}
        ewc.anchor = {k: v.float() for k, v in anchor.items()}
        ewc.mask = {n: f > 0 for n, f in ewc.fisher.items()}
        return ewc


def accumulate_fisher(
    previous: Mapping[str, Tensor] | None, new: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Sum of the Fisher of all consolidated domains (``previous`` may be ``None``)."""
    if previous is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: previous[k] + new[k] for k in new}


def numpy_to_state(model: PromptedPAD, arrays: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """Load numpy arrays into ``model``, growing its domains first.

    Raises
    ------
    CheckpointError
        Keys or shapes are not those of this architecture.
    """
    n_dom = sum(1 for k in arrays if k.startswith("domain_prompts."))
    model.ensure_domains(n_dom)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [
        k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"arrays do not fit {model.model_id}: a checkpoint from another model? "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {sorted(wrong)[:3]}"
        )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    )


def iter_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """Shuffled index batches over ``range(n)``."""
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
