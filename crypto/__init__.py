"""CKKS parameters, tenant keys, packing and scoring kernels, secrets at rest."""

if __name__ != "veilface.crypto":  # ./crypto/ found through a repository root on sys.path
    raise ImportError(
        f"{__name__!r} is veilface's crypto package found by its folder name (the veilface "
        "repository root is on sys.path); import veilface.crypto, or run from outside the "
        "repository root",
        name=__name__,
    )
