"""Per-operation costs of the scoring kernel with tenseal.sealapi (one core).

Run pinned to one core and read the medians::

    taskset -c 1 python scripts/kernel_roofline.py [--repeat 7] [--json out.json]

(CPU time per call, median of the repeats.)

Prints one JSON object: per-op medians in microseconds at the n4096
parameter set, and per-bin sums for the layouts of docs/architecture.md
("Kernel roofline").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.params import get_param_set


def _median_us(fn: Callable[[], object], inner: int, repeat: int) -> float:
    """Median over ``repeat`` runs of the mean CPU time of ``inner`` calls (microseconds).

    CPU time of this process (``time.process_time``), not wall time: on a
    machine shared with another job, time spent waiting for the core is not
    the kernel's cost (cache pollution by the other job still is).
    """
    runs = []
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(inner):
            fn()
        runs.append((time.process_time() - t) / inner * 1e6)
    return statistics.median(runs)


def _kernel(version: int, rep: int) -> dict[str, float]:
    """What a worker spends per bin and per query with :class:`BinKernel` (full bin, both stages)."""
    from veilface.crypto.kernel import BinKernel
    from veilface.crypto.keys import TenantKeys
    from veilface.crypto.public_context import PublicContext
    from veilface.crypto.tenant_crypto import TenantCrypto

    keys = TenantKeys.generate(128, layout_version=version)
    tc = TenantCrypto(keys)
    kern = BinKernel(PublicContext.from_bytes(keys.public_context_bytes()))
    lay = keys.layout
    rng = np.random.default_rng(1)
    x = rng.normal(size=(lay.capacity, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blobs = tc.encrypt_contribution(x, np.arange(lay.capacity))
    b = kern.load_bin(blobs)
    probe_blobs = tc.encrypt_probe(x[0])
    probe = kern.load_probe(probe_blobs)
    everything = list(range(lay.capacity))

    def stage(name: str) -> None:
        ct = kern.score(b, probe, name)
        kern.mask(ct, everything if name == "presel" else everything[:64])
        seal_io.to_bytes(ct)

    out = {
        "templates_per_bin": lay.capacity,
        "probe_ciphertexts": lay.g1,
        "presel_ms": _median_us(lambda: stage("presel"), 3, rep) / 1e3,
        "rest_ms": _median_us(lambda: stage("rest"), 3, rep) / 1e3,
        "probe_encrypt_ms": _median_us(lambda: tc.encrypt_probe(x[1]), 2, rep) / 1e3,
        "probe_load_ms": _median_us(lambda: kern.load_probe(probe_blobs), 2, rep) / 1e3,
        "probe_bytes": sum(len(p) for p in probe_blobs),
        "bin_bytes_seeded": sum(len(p) for p in blobs),
    }
    if kern.packer.available:  # the compiled product kernel (crypto/packed.py)
        held = kern.load_resident_bin(blobs)
        held_probe = kern.load_resident_probe(probe_blobs)

        def packed_stage(name: str) -> None:
            ct = kern.score(held, held_probe, name)
            kern.mask(ct, everything if name == "presel" else everything[:64])
            seal_io.to_bytes(ct)

        coefficients = np.empty((3, kern.packer.n), dtype=np.uint64)
        out.update(
            {
                "packed_presel_ms": _median_us(lambda: packed_stage("presel"), 3, rep) / 1e3,
                "packed_rest_ms": _median_us(lambda: packed_stage("rest"), 3, rep) / 1e3,
                "full_score_ms": _median_us(lambda: kern.score(b, probe, "full"), 3, rep) / 1e3,
                "packed_full_score_ms": _median_us(
                    lambda: kern.score(held, held_probe, "full"), 3, rep
                )
                / 1e3,
                "giant0_seal_ms": _median_us(lambda: kern.score_giants(b, probe, range(1)), 3, rep)
                / 1e3,
                "giant0_packed_ms": _median_us(
                    lambda: kern.score_giants(held, held_probe, range(1)), 3, rep
                )
                / 1e3,
                "giant_products_c_ms": _median_us(
                    lambda: kern.packer.giant_products(held, held_probe, 0, coefficients), 5, rep
                )
                / 1e3,
                "packed_probe_load_ms": _median_us(
                    lambda: kern.load_resident_probe(probe_blobs), 2, rep
                )
                / 1e3,
                "bin_load_seal_ms": _median_us(lambda: kern.load_bin(blobs), 1, rep) / 1e3,
                "bin_load_packed_ms": _median_us(lambda: kern.load_resident_bin(blobs), 1, rep)
                / 1e3,
            }
        )
        out["packed_bin_us_per_template"] = (
            (out["packed_presel_ms"] + out["packed_rest_ms"]) * 1e3 / lay.capacity
        )
    score_blob = seal_io.to_bytes(kern.score(b, probe, "presel"))
    out["client_decrypt_ms"] = _median_us(lambda: tc.decrypt_scores(score_blob), 10, rep) / 1e3
    out["bin_us_per_template"] = (out["presel_ms"] + out["rest_ms"]) * 1e3 / lay.capacity
    out["bytes_at_rest_per_template"] = out["bin_bytes_seeded"] / lay.capacity
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rep = args.repeat
    ps = get_param_set("n4096")
    ctx = ps.seal_context()
    kg = seal.KeyGenerator(ctx)
    sk = kg.secret_key()
    relin = seal_io.load_relin_keys(ctx, seal_io.to_bytes(kg.create_relin_keys()))
    tool = ctx.key_context_data().galois_tool()
    elts = [tool.get_elt_from_step(s) for s in (16, 32)]
    gk = seal_io.load_galois_keys(ctx, seal_io.to_bytes(kg.create_galois_keys(elts)))
    enc = seal.Encryptor(ctx, sk)
    dec = seal.Decryptor(ctx, sk)
    ev = seal.Evaluator(ctx)
    cod = seal.CKKSEncoder(ctx)
    rng = np.random.default_rng(0)
    slots = ps.slots
    scale = ps.scale
    real = rng.uniform(-0.1, 0.1, slots).tolist()
    cplx = (rng.uniform(-0.1, 0.1, slots) + 1j * rng.uniform(-0.1, 0.1, slots)).tolist()
    pt = seal.Plaintext()
    cod.encode(real, scale, pt)

    def fresh() -> seal.Ciphertext:
        return enc.encrypt_symmetric(pt)  # a Serializable: load it as a ciphertext

    def make_ct() -> seal.Ciphertext:
        return seal_io.load_ciphertext(ctx, seal_io.to_bytes(fresh()))

    a, b = make_ct(), make_ct()
    acc = seal.Ciphertext()
    ev.multiply(a, b, acc)
    tmp = seal.Ciphertext()
    ops: dict[str, float] = {}

    def mul_add() -> None:
        ev.multiply(a, b, tmp)
        ev.add_inplace(acc, tmp)

    ops["multiply_add"] = _median_us(mul_add, 200, rep)
    ops["multiply"] = _median_us(lambda: ev.multiply(a, b, tmp), 200, rep)
    ops["add"] = _median_us(lambda: ev.add_inplace(acc, tmp), 200, rep)
    three = seal.Ciphertext()
    ev.multiply(a, b, three)

    work = seal.Ciphertext()

    def mul_relin() -> None:
        ev.multiply(a, b, work)
        ev.relinearize_inplace(work, relin)

    # In place on a fresh product (what the kernel does), less the product itself.
    ops["relinearize"] = _median_us(mul_relin, 50, rep) - ops["multiply"]
    two = seal.Ciphertext()
    ev.relinearize(three, relin, two)
    out = seal.Ciphertext()
    ops["rotate"] = _median_us(lambda: ev.rotate_vector(two, 16, gk, out), 50, rep)
    ops["encode_real"] = _median_us(lambda: cod.encode(real, scale, pt), 50, rep)
    ops["encode_complex"] = _median_us(lambda: cod.encode(cplx, scale, pt), 50, rep)
    ops["encrypt_symmetric"] = _median_us(lambda: enc.encrypt_symmetric(pt), 50, rep)
    ops["encode_encrypt_serialize"] = _median_us(
        lambda: (cod.encode(real, scale, pt), seal_io.to_bytes(enc.encrypt_symmetric(pt))), 50, rep
    )
    seeded = seal_io.to_bytes(fresh())
    full2 = seal_io.to_bytes(two)
    full3 = seal_io.to_bytes(three)
    ops["serialize_size2"] = _median_us(lambda: seal_io.to_bytes(two), 50, rep)
    ops["serialize_size3"] = _median_us(lambda: seal_io.to_bytes(three), 50, rep)
    ops["load_seeded"] = _median_us(lambda: seal_io.load_ciphertext(ctx, seeded), 50, rep)
    ops["load_size2"] = _median_us(lambda: seal_io.load_ciphertext(ctx, full2), 50, rep)
    ops["load_size3"] = _median_us(lambda: seal_io.load_ciphertext(ctx, full3), 50, rep)
    dpt = seal.Plaintext()
    ops["decrypt_size2"] = _median_us(lambda: dec.decrypt(two, dpt), 50, rep)
    ops["decrypt_size3"] = _median_us(lambda: dec.decrypt(three, dpt), 50, rep)
    dec.decrypt(two, dpt)
    ops["decode_real"] = _median_us(lambda: cod.decode_double(dpt), 50, rep)
    ops["decode_complex"] = _median_us(lambda: cod.decode_complex(dpt), 50, rep)
    mpt = seal.Plaintext()
    cod.encode(cplx, two.parms_id(), two.scale, mpt)
    ops["add_plain"] = _median_us(lambda: ev.add_plain_inplace(two, mpt), 200, rep)
    sizes = {
        "seeded_bytes": len(seeded),
        "size2_bytes": len(full2),
        "size3_bytes": len(full3),
    }

    def per_bin(products: int, relins: int, rots: int) -> float:
        return products * ops["multiply_add"] + relins * ops["relinearize"] + rots * ops["rotate"]

    layouts = {
        "real_g16x8": {"templates": 2048, "products": 128, "relin": 8, "rot": 7, "probe_cts": 16},
        "complex_g16x8": {
            "templates": 4096,
            "products": 128,
            "relin": 8,
            "rot": 7,
            "probe_cts": 16,
        },
        "complex_g16x8_size3": {
            "templates": 4096,
            "products": 128,
            "relin": 7,
            "rot": 7,
            "probe_cts": 16,
        },
        "complex_g32x4": {
            "templates": 4096,
            "products": 128,
            "relin": 4,
            "rot": 3,
            "probe_cts": 32,
        },
        "complex_g32x4_size3": {
            "templates": 4096,
            "products": 128,
            "relin": 3,
            "rot": 3,
            "probe_cts": 32,
        },
    }
    for lay in layouts.values():
        arith = per_bin(lay["products"], lay["relin"], lay["rot"])
        lay["arith_ms"] = round(arith / 1e3, 3)
        lay["us_per_template"] = round(arith / lay["templates"], 3)
        lay["probe_encrypt_ms"] = round(lay["probe_cts"] * ops["encode_encrypt_serialize"] / 1e3, 2)
        lay["probe_bytes"] = lay["probe_cts"] * len(seeded)
    result = {
        "ops_us": {k: round(v, 1) for k, v in ops.items()},
        "sizes": sizes,
        "layouts": layouts,
        "kernel": {f"layout{v}": _kernel(v, rep) for v in (1, 2)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
