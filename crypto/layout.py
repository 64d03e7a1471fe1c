"""The diagonal bin layout (plain numpy; no HE here).

A *bin* is ``d_pad`` ciphertexts (``d_pad``: the template dimension rounded up
to a power of two) holding up to ``slots`` templates, one per slot. Slot ``s``
belongs to group ``s // d_pad`` at index ``i = s % d_pad``; diagonal ``j`` of
the bin holds, at slot ``s``, coordinate ``(i + j) mod d_pad`` of the
template enrolled at ``s`` (Halevi-Shoup diagonals, stacked ``slots/d_pad``
times). With the probe ``P`` repeated with period ``d_pad`` across the slots,

    score[s] = sum_j D_j[s] * P[s + j] = <template_s, probe>

exactly in every slot: no slot ever holds a partial or per-dimension
product, so nothing but summed scores leaves the server.

Baby-step/giant-step: ``j = a*g1 + b``. The tenant encrypts the ``g1``
rotations of the probe itself (no server rotation of the probe), and
enrollment stores diagonal ``j`` pre-rotated by ``-a*g1``, so the server needs
only ``g2 - 1`` rotations and ``g2`` relinearizations per bin:

    score = sum_a rot( sum_b D'_{a,b} * rot(P, b), a*g1 ).

Preselection (PFIP) scores the first ``presel_giants`` giant steps only: the
inner product over a window of ``m = presel_giants * g1`` coordinates of
each template. The rest of the giant steps, scored on the candidate bins,
add up to the full score.

*Staged* templates (single enrollments awaiting their fold into a bin) are
one ciphertext each: the template tiled with period ``d_pad`` over all the
slots (:meth:`DiagonalLayout.pack_staged`). Multiplied by the first probe
ciphertext (the probe with the same period) and summed over the rotations
``1, 2, 4, ..., d_pad/2`` (:attr:`DiagonalLayout.staged_steps`), every slot
holds the sum over one whole period, i.e. the full score: as with bins, no
slot ever carries a per-dimension product or a partial sum.

Layout versions (recorded in the key's public context, see
:mod:`veilface.crypto.public_context`; a context without one is version 1):

- **1** (keys made before complex packing): one template per slot, in the
  real part; ``g1 = 2^ceil(log2(d_pad) / 2)`` (16 for 128-d).
- **2** (the default for new keys): *two templates per slot*. The probe is
  real, so a template ``A`` in the real part and ``B`` in the imaginary part
  of a slot give, in one product, ``Re = <A, p>`` and ``Im = <B, p>``: a bin
  holds ``2 * slots`` templates for the cost of one, halving products, key
  switches, storage and the client's encryptions per template. Templates
  are addressed by *virtual slot* ``v`` in ``[0, 2 * slots)``: ``v <
  slots`` is the real part of slot ``v``, ``v >= slots`` the imaginary part
  of slot ``v - slots`` (so the first ``slots`` virtual slots are version
  1's). Baby steps ``g1 = min(32, d_pad)``: 32 probe ciphertexts and 3
  giant-step rotations (plus 4 relinearizations) per bin for 128-d, against
  16 and 7 (plus 8) in version 1.

Staged templates stay real in both versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument

FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]

#: The layout of keys made before the layout version was recorded.
LEGACY_LAYOUT_VERSION = 1
#: The layout new keys get.
CURRENT_LAYOUT_VERSION = 2
LAYOUT_VERSIONS = (1, 2)


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


@dataclass(frozen=True)
class DiagonalLayout:
    """Geometry of a bin for templates of dimension ``dim`` in ``slots`` slots."""

    dim: int
    slots: int
    presel_dims: int = 0  # 0: a quarter of d_pad
    version: int = LEGACY_LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.version not in LAYOUT_VERSIONS:
            raise InvalidArgument(
                f"unknown bin layout version {self.version}; this veilface knows {list(LAYOUT_VERSIONS)}"
            )
        if self.dim < 2:
            raise InvalidArgument(f"template dimension must be at least 2, got {self.dim}")
        if self.d_pad > self.slots:
            raise InvalidArgument(
                f"template dimension {self.dim} does not fit in {self.slots} slots; "
                "use a parameter set with a larger polynomial degree"
            )
        if self.presel_dims and (self.presel_dims % self.g1 or self.presel_dims > self.d_pad):
            raise InvalidArgument(
                f"preselection dimension must be a multiple of {self.g1} up to {self.d_pad}"
            )

    @property
    def d_pad(self) -> int:
        return _next_pow2(self.dim)

    @property
    def per_slot(self) -> int:
        """Templates per CKKS slot: 1 (real part only) or 2 (real and imaginary parts)."""
        return 2 if self.version >= 2 else 1

    @property
    def g1(self) -> int:
        """Baby steps: the number of probe ciphertexts."""
        if self.version >= 2:
            return min(32, self.d_pad)
        log = self.d_pad.bit_length() - 1
        return 1 << ((log + 1) // 2)

    @property
    def g2(self) -> int:
        """Giant steps: rotations (plus one) per bin."""
        return self.d_pad // self.g1

    @property
    def n_ciphertexts(self) -> int:
        return self.d_pad

    @property
    def capacity(self) -> int:
        """Templates per bin: the number of virtual slots."""
        return self.slots * self.per_slot

    @property
    def presel_giants(self) -> int:
        m = self.presel_dims or max(self.g1, self.d_pad // 4)
        return max(1, m // self.g1)

    @property
    def m(self) -> int:
        """Number of coordinates scored by preselection."""
        return self.presel_giants * self.g1

    @property
    def galois_steps(self) -> list[int]:
        return [a * self.g1 for a in range(1, self.g2)]

    @property
    def staged_steps(self) -> list[int]:
        """Rotations that sum a staged template's products over one period."""
        return [1 << r for r in range(self.d_pad.bit_length() - 1)]

    @property
    def key_steps(self) -> list[int]:
        """Every rotation a tenant key needs Galois keys for (bins and staging)."""
        return sorted(set(self.galois_steps) | set(self.staged_steps))

    def giants(self, stage: str) -> range:
        """Giant-step range of a stage: ``presel``, ``rest`` or ``full``."""
        if stage == "presel":
            return range(self.presel_giants)
        if stage == "rest":
            return range(self.presel_giants, self.g2)
        if stage == "full":
            return range(self.g2)
        raise InvalidArgument(f"unknown scoring stage {stage!r}")

    # -- packing --------------------------------------------------------

    def _pad(self, x: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InvalidArgument(f"templates must have shape [n, {self.dim}], got {arr.shape}")
        if self.d_pad == self.dim:
            return arr
        out = np.zeros((arr.shape[0], self.d_pad))
        out[:, : self.dim] = arr
        return out

    def check_slots(self, slot_idx: npt.ArrayLike) -> npt.NDArray[np.int64]:
        s = np.asarray(slot_idx, dtype=np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= self.capacity):
            raise InvalidArgument(f"slot positions must be in [0, {self.capacity})")
        if bool(np.all(s[1:] > s[:-1])):  # ascending (what the SDK sends): distinct
            return s
        if np.unique(s).size != s.size:
            raise InvalidArgument("slot positions must be distinct")
        return s

    def pack(self, templates: npt.ArrayLike, slot_idx: npt.ArrayLike) -> FloatArray | ComplexArray:
        """Plaintext vectors of a bin contribution.

        Parameters
        ----------
        templates : float array [n, dim]
        slot_idx : int array [n], distinct virtual slots in [0, capacity)

        Returns
        -------
        array [d_pad, slots], float64 (version 1) or complex128 (version 2):
        row ``k = a*g1 + b`` is the (pre-rotated) diagonal ``k``; zero outside
        the given slots (and, in version 2, outside their component).
        """
        x = self._pad(templates)
        v = self.check_slots(slot_idx)
        if v.size != x.shape[0]:
            raise InvalidArgument("one slot position per template is required")
        out: FloatArray | ComplexArray
        if self.per_slot == 1:
            out = np.zeros((self.d_pad, self.slots))
            self._scatter(out, x, v)
            return out
        out = np.zeros((self.d_pad, self.slots), dtype=np.complex128)
        imag = v >= self.slots
        self._scatter(out.real, x[~imag], v[~imag])
        self._scatter(out.imag, x[imag], v[imag] - self.slots)
        return out

    def _scatter(self, out: FloatArray, x: FloatArray, s: npt.NDArray[np.int64]) -> None:
        """Write templates ``x`` [n, d_pad] at physical slots ``s`` of the diagonals ``out``."""
        i = s % self.d_pad
        rows = np.arange(x.shape[0])
        for j in range(self.d_pad):
            u = (s + (j // self.g1) * self.g1) % self.slots
            out[j, u] = x[rows, (i + j) % self.d_pad]

    def _gather(self, diag: FloatArray, s: npt.NDArray[np.int64]) -> FloatArray:
        """Inverse of :meth:`_scatter`: templates [n, d_pad] at physical slots ``s``."""
        i = s % self.d_pad
        out = np.zeros((s.size, self.d_pad))
        rows = np.arange(s.size)
        for j in range(self.d_pad):
            u = (s + (j // self.g1) * self.g1) % self.slots
            out[rows, (i + j) % self.d_pad] = diag[j, u]
        return out

    # -- virtual slots ------------------------------------------------------

    def slot_values(self, decoded: npt.ArrayLike) -> FloatArray:
        """A decoded score vector (complex [slots]) as one value per virtual slot: float64 [capacity].

        Version 1 reads the real parts; version 2 the real parts, then the
        imaginary parts (virtual slot ``slots + s`` is the imaginary part of ``s``).
        """
        z = np.asarray(decoded)
        if z.shape != (self.slots,):
            raise InvalidArgument(f"a decoded score vector has {self.slots} slots, got {z.shape}")
        if self.per_slot == 1:
            return np.asarray(z.real, dtype=np.float64)
        return np.concatenate([z.real, z.imag]).astype(np.float64)

    def unmask(self, mask: ComplexArray, keep: npt.ArrayLike) -> None:
        """Zero, in a complex mask [slots], exactly the components of the virtual slots ``keep``.

        A kept virtual slot keeps its own component only: the other component
        of its slot stays masked (in version 1 that is the imaginary part,
        which no honest probe uses).
        """
        v = np.asarray(keep, dtype=np.int64).reshape(-1)
        if not v.size:
            return
        if v.min() < 0 or v.max() >= self.capacity:
            raise InvalidArgument(f"slot positions must be in [0, {self.capacity})")
        imag = v >= self.slots
        mask.real[v[~imag]] = 0.0
        mask.imag[v[imag] - self.slots] = 0.0

    def pack_staged(self, template: npt.ArrayLike) -> FloatArray:
        """Plaintext of a staged template: float64 [slots], the template tiled with period ``d_pad``."""
        x = self._pad(np.asarray(template, dtype=np.float64).reshape(1, -1))[0]
        return np.asarray(np.tile(x, self.slots // self.d_pad), dtype=np.float64)

    def unpack_staged(self, row: npt.ArrayLike) -> FloatArray:
        """Inverse of :meth:`pack_staged`: the template [dim] (mean over the periods)."""
        arr = np.asarray(row, dtype=np.float64)
        if arr.shape != (self.slots,):
            raise InvalidArgument(f"a staged row has {self.slots} slots, got {arr.shape}")
        return np.asarray(arr.reshape(-1, self.d_pad).mean(axis=0)[: self.dim], dtype=np.float64)

    def unpack(self, diagonals: npt.ArrayLike, slot_idx: npt.ArrayLike) -> FloatArray:
        """Inverse of :meth:`pack` for the given virtual slots: templates [n, dim].

        ``diagonals``: [d_pad, slots], real (version 1) or complex (version 2).
        """
        diag = np.asarray(diagonals)
        if diag.shape != (self.d_pad, self.slots):
            raise InvalidArgument(f"diagonals must have shape [{self.d_pad}, {self.slots}]")
        v = self.check_slots(slot_idx)
        imag = v >= self.slots
        out = np.zeros((v.size, self.d_pad))
        out[~imag] = self._gather(np.asarray(diag.real, dtype=np.float64), v[~imag])
        if imag.any():
            out[imag] = self._gather(np.asarray(diag.imag, dtype=np.float64), v[imag] - self.slots)
        return out[:, : self.dim]

    def probe_vectors(self, probe: npt.ArrayLike) -> FloatArray:
        """The ``g1`` baby-step rotations of the periodic probe: [g1, slots]."""
        p = self._pad(np.asarray(probe, dtype=np.float64).reshape(1, -1))[0]
        idx = np.arange(self.slots)
        return np.stack([p[(idx + b) % self.d_pad] for b in range(self.g1)])

    def plain_scores(
        self, diagonals: npt.ArrayLike, probe: npt.ArrayLike, stage: str = "full"
    ) -> FloatArray:
        """What the encrypted kernel computes, in plaintext (for tests): float64 [capacity]."""
        diag = np.asarray(diagonals)
        pv = self.probe_vectors(probe)
        total = np.zeros(self.slots, dtype=np.complex128)
        for a in self.giants(stage):
            part = np.zeros(self.slots, dtype=np.complex128)
            for b in range(self.g1):
                part += diag[a * self.g1 + b] * pv[b]
            total += np.roll(part, -a * self.g1)
        return self.slot_values(total)
