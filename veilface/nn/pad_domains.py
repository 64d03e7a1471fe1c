"""What the prompted PAD models share: domains added one by one, routed by nearest key.

:class:`DomainRouted` holds the per-domain parameter lists
(``domain_prompts``, ``domain_heads``, ``domain_keys``) and everything that
only depends on them: freezing, the shared weights Selective EWC protects,
the domain keys (mean and covariance of a capture descriptor) and the
linear-discriminant routing of an image to its domain. A model adds its
``backbone``, ``head``, :meth:`features`, :meth:`query_descriptor`,
:attr:`key_dim`, :attr:`prompted` and :meth:`add_domain`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from veilface.errors import InvalidArgument

__all__ = ["KEY_RIDGE", "DomainRouted"]

KEY_RIDGE = 1e-3
"""Ridge added to the pooled key covariance, relative to its mean variance."""


class DomainRouted(nn.Module):
    """Base of :class:`~veilface.nn.pad_vit.PromptedPAD` and :class:`~veilface.nn.pad_cnn.AdaptedCNNPAD`."""

    domain_prompts: nn.ParameterList
    domain_heads: nn.ParameterList
    domain_keys: nn.ParameterList

    @property
    def key_dim(self) -> int:
        raise NotImplementedError

    @property
    def prompted(self) -> bool:
        raise NotImplementedError

    def add_domain(self) -> int:
        raise NotImplementedError

    def query_descriptor(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _new_key(self) -> nn.Parameter:
        # key = (1 + D, D): row 0 the descriptor mean, rows 1.. its covariance;
        # a zero covariance = "key not set yet" (the domain is not consolidated)
        return nn.Parameter(torch.zeros(1 + self.key_dim, self.key_dim), requires_grad=False)

    def _domain_logit(self, out: Tensor, feat: Tensor, domain: Tensor | int | None) -> Tensor:
        """The shared head's logit plus domain ``domain``'s residual head ``w_t . f + b_t``."""
        if domain is None or not self.prompted:
            return out
        if isinstance(domain, int):
            dh = self.domain_heads[domain].expand(feat.shape[0], -1)
        else:
            dh = torch.stack(list(self.domain_heads))[domain]
        logit: Tensor = out + (feat * dh[:, :-1]).sum(1) + dh[:, -1]
        return logit

    @property
    def num_domains(self) -> int:
        """Domains added so far."""
        return len(self.domain_prompts)

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
