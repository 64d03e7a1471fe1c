"""veilface: privacy-preserving face identification.

Subpackages by role (see docs/architecture.md):

- ``veilface.crypto``: CKKS parameters, tenant keys, packing and scoring kernels.
- ``veilface.server``: the gRPC identification service (never holds a secret key).
- ``veilface.client``: the tenant SDK (keys, routing, face pipeline).
- ``veilface.federated``: Flower apps for training across camera sites.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
