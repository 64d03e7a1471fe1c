"""Server-side homomorphic kernels over bins (no secret key here).

Costs at N=4096 on one core (see docs/benchmarks.md): a bin of 128 diagonal
ciphertexts holds 2048 templates of 128-d; scoring it is 128 ct x ct
products (~0.09 ms each, no relinearization), 8 relinearizations and 7
rotations: ~20 ms, about 10 us per template. SEAL's evaluator is
single-threaded and holds the GIL, so the server parallelizes over bins in
worker processes (``veilface.server.scoring``).
"""

from __future__ import annotations

from collections.abc import Sequence

import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.ciphertext_checks import load_checked, load_many
from veilface.crypto.public_context import PublicContext

Bin = list[seal.Ciphertext]


class BinKernel:
    """Evaluate enrollments and scores for one tenant key."""

    def __init__(self, public: PublicContext) -> None:
        self.public = public
        self.layout = public.layout
        self._ctx = public.context
        self._scale = public.param_set.scale
        self._evaluator = seal.Evaluator(self._ctx)

    # -- loading --------------------------------------------------------

    def load_bin(self, blobs: Sequence[bytes]) -> Bin:
        """Load and validate a bin (or a contribution to one): ``d_pad`` ciphertexts."""
        return load_many(
            self._ctx, blobs, expected=self.layout.n_ciphertexts, scale=self._scale, what="bin"
        )

    def load_some(self, blobs: Sequence[bytes], start: int, stop: int) -> Bin:
        """Load and validate ciphertexts ``start:stop`` of a bin contribution."""
        if len(blobs) != self.layout.n_ciphertexts:
            from veilface.errors import InvalidCiphertext

            raise InvalidCiphertext(
                f"expected {self.layout.n_ciphertexts} bin ciphertexts, got {len(blobs)}"
            )
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
        return load_many(self._ctx, blobs, expected=self.layout.g1, scale=self._scale, what="probe")

    # -- enrollment -----------------------------------------------------

    def add_into(self, bin_cts: Bin, contribution: Bin) -> None:
        """Add a contribution into a bin, in place (homomorphic enrollment)."""
        for acc, ct in zip(bin_cts, contribution, strict=True):
            self._evaluator.add_inplace(acc, ct)

    def add_scores(self, acc: seal.Ciphertext, other: seal.Ciphertext) -> None:
        """Add two score ciphertexts in place (same scale, both relinearized)."""
        self._evaluator.add_inplace(acc, other)

    @staticmethod
    def serialize(cts: Sequence[seal.Ciphertext]) -> list[bytes]:
        return [seal_io.to_bytes(ct) for ct in cts]

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

    def score(self, bin_cts: Bin, probe: Bin, stage: str) -> seal.Ciphertext:
        return self.score_giants(bin_cts, probe, self.layout.giants(stage))

    def score_giants(self, bin_cts: Bin, probe: Bin, giants: range) -> seal.Ciphertext:
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
        for a in giants:
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
