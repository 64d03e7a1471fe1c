"""Synthetic face templates whose cosine statistics look like a real model's.

A template is ``normalize(a*m + b*z_id + c*s*z)``: ``m`` a direction shared
by every face (real embeddings live in a cone: dlib's impostor cosines are
far from 0), ``z_id`` the identity centre, ``z`` per-capture noise with a
per-capture strength ``s`` (log-normal, so some captures are much worse, as
in real galleries). With coordinates of variance ``1/d``, the expected
impostor cosine is ``a^2`` and the genuine one ``a^2 + b^2`` (times ``1/(1 +
c^2 (E[s^2] - 1))``). The defaults are fitted to dlib's 128-d embeddings of
LFW (``veilface bench calibrate`` prints the fit; docs/benchmarks.md records
both distributions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SyntheticFaces:
    dim: int = 128
    # Fitted to dlib on LFW (3,681 photos of 1,264 people): genuine cosine
    # 0.952 +- 0.020, impostor 0.834 +- 0.034 (docs/benchmarks.md).
    impostor_mean: float = 0.826  # + ~0.008 from the group structure below
    genuine_mean: float = 0.952
    noise_spread: float = 0.25  # sigma of log(s)
    # Population structure: identity centres share one of `groups` directions
    # with weight `group_weight` (real faces cluster by sex, age, ancestry,
    # capture conditions); it widens the impostor distribution as in dlib's.
    groups: int = 8
    group_weight: float = 0.5

    def _coeffs(self) -> tuple[float, float, float]:
        a2 = self.impostor_mean
        b2 = self.genuine_mean - self.impostor_mean
        c2 = max(1e-6, 1.0 - self.genuine_mean)
        return float(np.sqrt(a2)), float(np.sqrt(b2)), float(np.sqrt(c2))

    def sample(
        self, n_ids: int, per_id: int, *, seed: int = 0
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.str_]]:
        """``n_ids * per_id`` unit templates, grouped by identity: (emb [n, dim], labels [n])."""
        rng = np.random.default_rng(seed)
        a, b, c = self._coeffs()
        d = self.dim
        common = np.random.default_rng(1234).normal(size=d)
        common /= np.linalg.norm(common)
        ids = rng.normal(scale=1 / np.sqrt(d), size=(n_ids, d))
        if self.groups > 0 and self.group_weight > 0:
            centres = np.random.default_rng(4321).normal(scale=1 / np.sqrt(d), size=(self.groups, d))
            which = rng.integers(0, self.groups, size=n_ids)
            w = self.group_weight
            ids = np.sqrt(1 - w) * ids + np.sqrt(w) * centres[which]
        noise = rng.normal(scale=1 / np.sqrt(d), size=(n_ids, per_id, d))
        strength = np.exp(rng.normal(scale=self.noise_spread, size=(n_ids, per_id, 1)))
        strength /= np.sqrt(np.exp(2 * self.noise_spread**2))  # E[s^2] = 1
        x = a * common + b * ids[:, None, :] + c * strength * noise
        x = x.reshape(n_ids * per_id, d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        labels = np.repeat(np.array([f"id{i:07d}" for i in range(n_ids)]), per_id)
        return x.astype(np.float32), labels


def cosine_stats(emb: npt.ArrayLike, labels: npt.ArrayLike, *, max_pairs: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Mean and std of genuine and impostor cosines (sampled pairs)."""
    x = np.asarray(emb, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), size=max_pairs)
    j = rng.integers(0, len(x), size=max_pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    cos = np.einsum("ij,ij->i", x[i], x[j])
    same = lab[i] == lab[j]
    gen = []
    for name in np.unique(lab):
        rows = np.flatnonzero(lab == name)
        for p in range(len(rows)):
            for q in range(p + 1, len(rows)):
                gen.append(float(x[rows[p]] @ x[rows[q]]))
    g = np.array(gen) if gen else cos[same]
    imp = cos[~same]
    return {
        "genuine_mean": float(g.mean()),
        "genuine_std": float(g.std()),
        "impostor_mean": float(imp.mean()),
        "impostor_std": float(imp.std()),
        "genuine_pairs": int(g.size),
    }
