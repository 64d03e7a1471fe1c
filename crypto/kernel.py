"""Server-side homomorphic kernels over bins (no secret key here).

Costs at N=4096 on one core (docs/architecture.md, "Kernel roofline"): a
bin of 128 diagonal ciphertexts holds 4096 templates of 128-d (layout 2,
two per slot; 2048 in layout 1); scoring it is 128 ct x ct products
(multiply-and-add, no relinearization), then 4 relinearizations and 3
rotations (layout 2; 8 and 7 in layout 1). SEAL's evaluator is
single-threaded and holds the GIL, so the server parallelizes over bins in
worker processes (``veilface.server.scoring``).

Masking (:meth:`BinKernel.mask`): a score ciphertext holds a score in every
slot, but a response needs only some of them (the claimed subject's slot
for a verification, the requested slots for a re-ranking). Every other slot
gets a fresh uniform random value, real and imaginary parts in
``[-M, M]``, so a key holder decrypting the response learns nothing useful
there. ``M`` is as large as the modulus allows; see :func:`mask_magnitude`.
Every masked ciphertext is then re-randomized with a fresh encryption of
zero under the tenant's public key (:mod:`veilface.crypto.rerandomize`):
the mask hides the first component's slots, the re-randomization the
second component, which the probe would otherwise let a key holder read.
A key whose context has no public key gets no masked response at all.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.ciphertext_checks import check_count, load_checked, load_many
from veilface.crypto.packed import PackedBin, Packer
from veilface.crypto.public_context import PublicContext
from veilface.crypto.rerandomize import Rerandomizer
from veilface.errors import FailedPrecondition

Bin = list[seal.Ciphertext]
AnyBin = Bin | PackedBin  # a worker holds bins packed when the product kernel is built
ScoreCiphertext = seal.Ciphertext  # one relinearized score ciphertext (scale^2)
FloatArray = npt.NDArray[Any]  # float64 or complex128 slot vectors

# Chance, per masked response ciphertext, that a mask must be drawn again
# (see :func:`mask_magnitude`).
MASK_RETRY_LOG2 = -40
# Room left under the decryption bound for the kept scores themselves
# (their coefficients are at most 2/N * sum |score| <= 2 * max |score|).
SCORE_HEADROOM = 4.0


def mask_magnitude(poly_modulus_degree: int, data_modulus: int, score_scale: float) -> float:
    """The largest mask magnitude ``M`` a score ciphertext can carry safely.

    A score ciphertext has one data prime ``q`` (a 60-bit prime) and scale
    ``score_scale`` (2^52: the product of two 2^26 encodings, no rescale).
    Decryption gives polynomial coefficients in ``(-q/2, q/2)``; divided by
    the scale they must stay under ``q / 2 / score_scale`` (128) or they
    wrap and every slot, the kept ones too, decodes to garbage.

    SEAL's encoder is stricter: it refuses a plaintext with a coefficient
    over ``2^(log2 q - 2)``, i.e. 64 in slot units (``ceil(log2 c) + 1`` must
    stay under the modulus' 60 bits). So a mask that encodes at all keeps
    every coefficient of the response under 64 + 4 < 128: it can never
    corrupt the kept slots. What remains is how often a mask must be drawn
    again because it does not encode.

    A slot vector ``z`` of ``N/2`` values becomes the coefficients
    ``c_k = 2/N * sum_j Re(z_j * w_jk)`` with ``|w_jk| = 1``. With real and
    imaginary parts uniform in ``[-M, M]`` each ``c_k`` is a weighted sum of
    independent uniforms, which are strictly sub-Gaussian, so
    ``P(|c_k| > t) <= 2 exp(-t^2 / (2 s^2))`` with ``s = M * sqrt(2 / (3N))``
    (N = 4096: M / 78). Asking that none of the ``N`` coefficients exceeds
    ``t = 64`` but with probability ``2^MASK_RETRY_LOG2`` gives
    ``t / s >= sqrt(2 (ln 2N - MASK_RETRY_LOG2 ln 2))`` (8.6), hence
    ``M`` = 585 at N = 4096 and 819 at N = 8192. A redraw that rare leaves
    the masks' distribution uniform up to 2^-40 in statistical distance.
    """
    n = poly_modulus_degree
    decrypt_bound = data_modulus / 2 / score_scale
    encode_bound = 2.0 ** (data_modulus.bit_length() - 2) / score_scale
    if encode_bound + SCORE_HEADROOM > decrypt_bound:
        raise ValueError("the score modulus leaves no room for masks")
    z = math.sqrt(2 * (math.log(2 * n) - MASK_RETRY_LOG2 * math.log(2)))
    return float(math.floor(encode_bound / z * math.sqrt(1.5 * n)))


_MASK_ATTEMPTS = 8

NO_PUBLIC_KEY = (
    "this key was registered without a public key, so the server cannot re-randomize "
    "its score responses and answers none; register the key again "
    "(`veilface tenant register`, or VeilClient.register_key()): the server adds the public key "
    "to the key as it is, bins and subjects unchanged"
)


def _uniform(n: int, magnitude: float) -> FloatArray:
    """``n`` floats uniform in ``[-magnitude, magnitude)`` from the OS CSPRNG."""
    raw = np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64)
    unit = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.asarray((2.0 * unit - 1.0) * magnitude, dtype=np.float64)


class BinKernel:
    """Evaluate enrollments and scores for one tenant key."""

    def __init__(self, public: PublicContext, *, zero_pool: int = 0) -> None:
        """``zero_pool``: encryptions of zero to keep ready for re-randomization (:class:`Rerandomizer`)."""
        self.public = public
        self.layout = public.layout
        self._ctx = public.context
        self._scale = public.param_set.scale
        self._evaluator = seal.Evaluator(self._ctx)
        self._encoder = seal.CKKSEncoder(self._ctx)
        data_modulus = self._ctx.first_context_data().parms().coeff_modulus()[0].value()
        self.mask_magnitude = mask_magnitude(
            public.param_set.poly_modulus_degree, data_modulus, self._scale * self._scale
        )
        self._rerandomizer = (
            Rerandomizer(self._ctx, public.public_key, pool_size=zero_pool)
            if public.public_key is not None
            else None
        )
        self.packer = Packer(self._ctx)

    @property
    def rerandomizer(self) -> Rerandomizer | None:
        return self._rerandomizer

    # -- loading --------------------------------------------------------

    def load_bin(self, blobs: Sequence[bytes]) -> Bin:
        """Load and validate a bin (or a contribution to one): ``d_pad`` ciphertexts."""
        return list(
            load_many(
                self._ctx, blobs, expected=self.layout.n_ciphertexts, scale=self._scale, what="bin"
            )
        )

    def load_resident_bin(self, blobs: Sequence[bytes]) -> AnyBin:
        """:meth:`load_bin` into the form a worker keeps (:meth:`resident`), validated.

        Packed, the bytes are read without SEAL, seeded ones expanded from
        their seed (:meth:`Packer.parse`): 0.16 ms a ciphertext, against
        0.37 for SEAL's load and a re-serialization to read it back.
        """
        if not self.packer.available:
            return self.load_bin(blobs)
        check_count(blobs, self.layout.n_ciphertexts, "bin")
        return self.packer.load(blobs, scale=self._scale, what="bin")

    def load_some(self, blobs: Sequence[bytes], start: int, stop: int) -> Bin:
        """Load and validate ciphertexts ``start:stop`` of a bin contribution."""
        check_count(blobs, self.layout.n_ciphertexts, "bin")
        return [
            load_checked(self._ctx, blobs[i], scale=self._scale, what=f"bin ciphertext {i}")
            for i in range(start, stop)
        ]

    def load_checked_each(self, blobs: Sequence[bytes]) -> Bin:
        """Load and validate ciphertexts of a bin's format, whatever their number."""
        return [load_checked(self._ctx, b, scale=self._scale, what="bin ciphertext") for b in blobs]

    def load_staged(self, blob: bytes) -> seal.Ciphertext:
        """Load and validate one staged template ciphertext."""
        return load_checked(self._ctx, blob, scale=self._scale, what="staged template")

    def load_probe(self, blobs: Sequence[bytes]) -> Bin:
        return list(
            load_many(self._ctx, blobs, expected=self.layout.g1, scale=self._scale, what="probe")
        )

    def load_resident_probe(self, blobs: Sequence[bytes]) -> AnyBin:
        """A probe in the form bins are scored against (:meth:`resident`), validated.

        Packed, the bytes are read without SEAL (:meth:`Packer.parse`: 5 ms
        for 32 seeded ciphertexts, their uniform halves expanded from the
        seeds; 1 ms in full form), against 8.5 ms for SEAL's load and 7 ms
        more to read back what it loaded.
        """
        if not self.packer.available:
            return self.load_probe(blobs)
        check_count(blobs, self.layout.g1, "probe")
        return self.packer.load(blobs, scale=self._scale, what="probe")

    def resident(self, cts: Bin) -> AnyBin:
        """The form a worker keeps a loaded bin (or probe) in: packed where the kernel is built."""
        return self.packer.pack(cts) if self.packer.available else cts

    # -- enrollment -----------------------------------------------------

    def add_into(self, bin_cts: AnyBin, contribution: AnyBin) -> None:
        """Add a contribution into a bin, in place (homomorphic enrollment)."""
        if isinstance(bin_cts, PackedBin):
            if not isinstance(contribution, PackedBin):
                contribution = self.packer.pack(contribution)
            self.packer.add_into(bin_cts, contribution)
            return
        if isinstance(contribution, PackedBin):
            contribution = self.packer.unpack(contribution)
        for acc, ct in zip(bin_cts, contribution, strict=True):
            self._evaluator.add_inplace(acc, ct)

    def add_scores(self, acc: seal.Ciphertext, other: seal.Ciphertext) -> None:
        """Add two score ciphertexts in place (same scale, both relinearized)."""
        self._evaluator.add_inplace(acc, other)

    @staticmethod
    def serialize(cts: Sequence[seal.Ciphertext]) -> list[bytes]:
        return [seal_io.to_bytes(ct) for ct in cts]

    def serialize_bin(self, bin_cts: AnyBin) -> list[bytes]:
        """A bin's ciphertexts in SEAL's serialization, whatever form it is held in."""
        cts = self.packer.unpack(bin_cts) if isinstance(bin_cts, PackedBin) else bin_cts
        return self.serialize(cts)

    # -- scoring --------------------------------------------------------

    def score_staged(
        self, staged: seal.Ciphertext, probe: Bin, center: Bin | None = None
    ) -> seal.Ciphertext:
        """Full score of a staged template, in every slot.

        ``probe[0]`` (and ``center[0]``, added first for centered probes) has
        period ``d_pad`` like the staged template, so after one product the
        rotate-and-sum over ``staged_steps`` leaves in each slot the sum over
        a whole period: the inner product, never a partial sum.
        """
        if not self.public.supports_staging:
            raise ValueError("this key's public context has no Galois keys for staged scoring")
        ev = self._evaluator
        q = probe[0]
        if center is not None:
            q = seal.Ciphertext()
            ev.add(probe[0], center[0], q)
        out = seal.Ciphertext()
        ev.multiply(staged, q, out)
        ev.relinearize_inplace(out, self.public.relin_keys)
        tmp = seal.Ciphertext()
        for step in self.layout.staged_steps:
            ev.rotate_vector(out, step, self.public.galois_keys, tmp)
            ev.add_inplace(out, tmp)
        return out

    # -- masking --------------------------------------------------------

    def mask(self, ct: seal.Ciphertext, keep: Sequence[int]) -> None:
        """Drown every virtual slot but ``keep`` under fresh uniform random values, in place.

        Real and imaginary parts of every slot get independent values
        uniform in ``[-M, M]`` (``M`` = :attr:`mask_magnitude`), drawn from
        the OS CSPRNG for this call only (imaginary parts too: a crafted
        complex probe would otherwise leak through them), except the one
        component of each kept virtual slot (:meth:`DiagonalLayout.unmask`):
        it gets 0 and decrypts to its score. The other component of a kept
        slot stays masked (the other template of that slot in layout 2; the
        unused imaginary part in layout 1). A value
        ``v`` under such a mask is within statistical distance ``|v| / (2M)``
        of the mask alone. Cost: one encode and one plaintext addition, then
        the re-randomization (a public-key encryption of zero, 0.8 ms).
        """
        idx = np.asarray(keep, dtype=np.int64)

        def draw() -> FloatArray:
            values = self._uniform_complex()
            self.layout.unmask(values, idx)
            return values

        self._add_mask(ct, draw)

    def mask_keep_mean(self, ct: seal.Ciphertext) -> None:
        """Mask every slot so that only the mean of the real parts survives, in place.

        For a staged template's score, which the tenant reads as the mean
        over the slots: the real masks are uniform values minus their mean
        (they sum to zero), the imaginary masks plain uniform. With an honest
        (periodic) probe every slot holds the same score and the mean is it;
        with a crafted probe the mean is one inner product of the template
        with the probe averaged over its periods, no more than an honest
        query gives, while each single slot (a window sum, from which a
        crafted probe reads the whole template in one query) is drowned.
        """

        def draw() -> FloatArray:
            values = self._uniform_complex()
            values.real -= values.real.mean()
            return values

        self._add_mask(ct, draw)

    def _uniform_complex(self) -> FloatArray:
        n, m = self.layout.slots, self.mask_magnitude
        return _uniform(n, m) + 1j * _uniform(n, m)

    def _add_mask(self, ct: seal.Ciphertext, draw: Callable[[], FloatArray]) -> None:
        """Encode a mask at the ciphertext's level and scale, add it, re-randomize.

        SEAL refuses to encode a mask with a coefficient past its bound; that
        happens with probability 2^-40 (:func:`mask_magnitude`) and the mask
        is then drawn again, never clipped. Raises
        :class:`~veilface.errors.FailedPrecondition` (before any work) for a
        key registered without a public key: its response could not be
        re-randomized.
        """
        rerandomizer = self._rerandomizer
        if rerandomizer is None:
            raise FailedPrecondition(NO_PUBLIC_KEY)
        pt = seal.Plaintext()
        for _ in range(_MASK_ATTEMPTS):
            try:
                self._encoder.encode(draw().tolist(), ct.parms_id(), ct.scale, pt)
            except ValueError:
                continue
            self._evaluator.add_plain_inplace(ct, pt)
            rerandomizer.apply(ct)
            return
        raise RuntimeError("could not draw an encodable mask; is the mask magnitude too large?")

    def score(self, bin_cts: AnyBin, probe: AnyBin, stage: str) -> seal.Ciphertext:
        return self.score_giants(bin_cts, probe, self.layout.giants(stage))

    def score_giants(self, bin_cts: AnyBin, probe: AnyBin, giants: range) -> seal.Ciphertext:
        """Encrypted scores of every slot of the bin for a stage.

        Parameters
        ----------
        bin_cts : the bin's ``d_pad`` diagonal ciphertexts
        probe : the ``g1`` baby-step probe ciphertexts
        stage : ``presel`` (first giant steps), ``rest`` or ``full``; or
            ``giants``: any sub-range of giant steps (partial sums add up)

        Returns
        -------
        One relinearized ciphertext at scale ``scale**2``; slot ``s`` holds
        the (partial) inner product of the template at ``s`` with the probe.
        """
        ev = self._evaluator
        g1 = self.layout.g1
        total: seal.Ciphertext | None = None
        tmp = seal.Ciphertext()
        if len(giants) == 0:
            raise ValueError("no giant step to score")
        if isinstance(bin_cts, PackedBin) and not isinstance(probe, PackedBin):
            probe = self.packer.pack(probe)
        elif isinstance(probe, PackedBin) and not isinstance(bin_cts, PackedBin):
            bin_cts = self.packer.pack(bin_cts)
        coefficients = np.empty((3, self.packer.n), dtype=np.uint64)
        for a in giants:
            if isinstance(bin_cts, PackedBin) and isinstance(probe, PackedBin):
                # the same bits as the loop below, in one fused pass (crypto/packed.py)
                self.packer.giant_products(bin_cts, probe, a * g1, coefficients)
                part = self.packer.ciphertext(coefficients, bin_cts.scale * probe.scale)
            else:
                assert not isinstance(bin_cts, PackedBin) and not isinstance(probe, PackedBin)
                part = seal.Ciphertext()
                ev.multiply(bin_cts[a * g1], probe[0], part)
                for b in range(1, g1):
                    ev.multiply(bin_cts[a * g1 + b], probe[b], tmp)
                    ev.add_inplace(part, tmp)
            if a:
                ev.relinearize_inplace(part, self.public.relin_keys)
                ev.rotate_vector_inplace(part, a * g1, self.public.galois_keys)
            if total is None:
                total = part
            else:
                ev.add_inplace(total, part)
        assert total is not None  # every stage has at least one giant step
        if total.size() > 2:
            ev.relinearize_inplace(total, self.public.relin_keys)
        return total
