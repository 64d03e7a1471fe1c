"""Tenant key generation: the secret key and the public context derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.layout import CURRENT_LAYOUT_VERSION, LEGACY_LAYOUT_VERSION, DiagonalLayout
from veilface.crypto.params import DEFAULT_PARAM_SET, ParamSet, get_param_set
from veilface.crypto.public_context import encode_public_context


@dataclass
class TenantKeys:
    """A tenant's CKKS secret key with its parameter set and layout.

    Lives only in the tenant's trusted zone; persist it with
    :mod:`veilface.crypto.keystore`, never in clear.
    """

    param_set: ParamSet
    layout: DiagonalLayout
    context: seal.SEALContext
    secret_key: seal.SecretKey

    @classmethod
    def generate(
        cls,
        dim: int,
        *,
        param_set: str = DEFAULT_PARAM_SET,
        presel_dims: int = 0,
        layout_version: int = CURRENT_LAYOUT_VERSION,
    ) -> TenantKeys:
        """A new secret key; new keys get the current bin layout unless told otherwise."""
        ps = get_param_set(param_set)
        layout = DiagonalLayout(dim, ps.slots, presel_dims, layout_version)
        context = ps.seal_context()
        keygen = seal.KeyGenerator(context)
        return cls(ps, layout, context, keygen.secret_key())

    @classmethod
    def from_secret_bytes(
        cls,
        secret: bytes,
        *,
        dim: int,
        param_set: str,
        presel_dims: int = 0,
        layout_version: int = LEGACY_LAYOUT_VERSION,
    ) -> TenantKeys:
        """A stored key; ``layout_version`` defaults to the layout of keys stored without one."""
        ps = get_param_set(param_set)
        layout = DiagonalLayout(dim, ps.slots, presel_dims, layout_version)
        context = ps.seal_context()
        return cls(ps, layout, context, seal_io.load_secret_key(context, secret))

    def secret_key_bytes(self) -> bytes:
        return seal_io.to_bytes(self.secret_key)

    def public_context_bytes(self, *, with_public_key: bool = True) -> bytes:
        """Parameters, relinearization keys, the Galois keys the layout needs, a public key.

        Only the rotation steps of the giant steps and of staged scoring get
        keys (one key switch per rotation), not TenSEAL's full set. The
        public key lets the server re-randomize its responses
        (:mod:`veilface.crypto.rerandomize`); ``with_public_key=False``
        builds a context as keys registered before it had (tests only).
        """
        keygen = seal.KeyGenerator(self.context, self.secret_key)
        relin = keygen.create_relin_keys()
        tool = self.context.key_context_data().galois_tool()
        elts = [tool.get_elt_from_step(step) for step in self.layout.key_steps]
        galois = keygen.create_galois_keys(elts)
        public_key = seal.PublicKey()
        keygen.create_public_key(public_key)
        return encode_public_context(
            self.param_set,
            self.layout,
            seal_io.to_bytes(self.param_set.seal_parameters()),
            seal_io.to_bytes(relin),
            seal_io.to_bytes(galois),
            seal_io.to_bytes(public_key) if with_public_key else None,
        )
