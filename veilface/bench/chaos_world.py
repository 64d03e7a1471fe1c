"""What ``veilface bench chaos`` sets up before the attack, and the oracle it checks against.

Three tenants on one fresh server:

- ``chaos-a``, the victim: key ``k1`` (the gallery a legitimate client
  keeps identifying against, bulk plus single enrollments) and a second key
  ``k2`` with a small gallery (for cross-key attacks);
- ``chaos-b``, another victim: one key and a gallery (its token and ids
  are the "other tenant's" in the attacks on A, and A's in the attacks on B);
- ``chaos-x``, the attacker's own tenant: a valid token and two keys with
  small galleries. Hostile requests that a server cannot tell from
  legitimate ones (a bit-flipped ciphertext that still loads, a foreign
  key's ciphertext, a new key) are sent here, so that they can only spoil
  the attacker's own gallery, never the galleries that are checked.

The benchmark keeps every enrolled template in clear (it plays the tenants),
so after the attack it can check identification against an exhaustive
plaintext cosine search over exactly what was enrolled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.bench.chaos_target import ChaosServer
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.client.transport import Transport
from veilface.errors import VeilfaceError
from veilface.proto.v1 import veilface_pb2 as pb

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

TENANT_A, TENANT_B, TENANT_X = "chaos-a", "chaos-b", "chaos-x"


@dataclass
class KeySet:
    """One tenant key and its gallery in clear (the oracle), in enrollment order."""

    name: str  # "a.k1"
    tenant_id: str
    token: str
    state: TenantState
    subjects: list[str]
    gallery: FloatArray  # [n, dim] enrolled templates
    probes: FloatArray  # [n, dim] a second capture of each subject
    handles: list[str] = field(default_factory=list)
    bins: list[tuple[int, int]] = field(default_factory=list)  # (bin id, version) after set-up
    g1: int = 0  # ciphertexts per probe
    n_ct: int = 0  # ciphertexts per bin
    capacity: int = 0  # slots per bin

    @property
    def key_id(self) -> str:
        return str(self.state.key_id)

    def client(self, target: str, token: str | None = None) -> VeilClient:
        return VeilClient(target, self.state, token=token or self.token, encrypt_workers=0)

    def plaintext_top1(self, probe: npt.ArrayLike) -> tuple[int, float, float]:
        """(index, best cosine, second best cosine) of an exhaustive search of the gallery."""
        g = self.gallery / np.linalg.norm(self.gallery, axis=1, keepdims=True)
        p = np.asarray(probe, dtype=np.float64)
        cos = g @ (p / np.linalg.norm(p))
        order = np.argsort(-cos)
        second = float(cos[order[1]]) if len(order) > 1 else float("-inf")
        return int(order[0]), float(cos[order[0]]), second


@dataclass
class Samples:
    """Valid material the generators corrupt (all of the attacker's tenant unless named)."""

    probes: dict[str, list[bytes]]  # key name -> a valid probe under that key
    staged: bytes  # x.k1: one staged template
    contribution: list[bytes]  # x.k1: a one-template contribution at slot 0
    bulk: list[bytes]  # x.k1: a bin with templates at slots 0..3
    context: bytes  # x.k1's public context
    photo_ids: dict[str, str]  # tenant id -> one of its photo ids


@dataclass
class World:
    keys: dict[str, KeySet]
    tokens: dict[str, str]  # tenant id -> its first (every-scope) token
    admin_token: str
    legit_token: str  # the legitimate client's own token of tenant A
    samples: Samples
    query_token: str | None = None  # tenant X, query scope only (None: no Tokens service)
    revoked_token: str | None = None  # tenant X, every scope, revoked

    def key(self, name: str) -> KeySet:
        return self.keys[name]


@dataclass(frozen=True)
class WorldSize:
    gallery: int = 512  # a.k1 bulk
    other: int = 256  # b.k1 bulk
    small: int = 64  # a.k2, x.k1, x.k2 bulk
    single: int = 4  # single enrollments of a.k1 (half staged then folded, half direct)


def _faces(n: int, seed: int) -> tuple[FloatArray, list[str], FloatArray]:
    emb, lab = SyntheticFaces().sample(n, 2, seed=seed)
    return emb[0::2], [str(x) for x in lab[0::2]], emb[1::2]


def _create_tenant(srv: ChaosServer, tenant_id: str) -> str:
    with AdminClient(srv.target, token=srv.admin_token) as admin:
        return str(admin.create_tenant(tenant_id).api_token)


def _tokens_call(srv: ChaosServer, token: str, method: str, request: Any) -> Any:
    """Call the Tokens service (if the server has one); None when it has not or refuses."""
    if "Tokens" not in pb.DESCRIPTOR.services_by_name:
        return None
    from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc

    t = Transport(srv.target, token=token)
    try:
        stub = pb_grpc.TokensStub(t.channel)
        return t.call(getattr(stub, method), request)
    except Exception as exc:  # noqa: BLE001 - an evolving API must not stop the benchmark
        log.info("Tokens.%s unavailable (%s)", method, type(exc).__name__)
        return None
    finally:
        t.close()


def mint_token(srv: ChaosServer, tenant_id: str, token: str, name: str, scopes: list[str]) -> tuple[str, str] | None:
    """A new token of the tenant with the named scopes: (secret, token id), or None.

    ``scopes``: "query", "enroll", "manage". None when the server has no
    Tokens service (older servers) or refuses.
    """
    cls = getattr(pb, "CreateTokenRequest", None)
    if cls is None:
        return None
    numbers = [getattr(pb, f"TOKEN_SCOPE_{n.upper()}") for n in scopes]
    resp = _tokens_call(srv, token, "CreateToken", cls(tenant_id=tenant_id, name=name, scopes=numbers))
    if resp is None or not resp.api_token:
        return None
    return str(resp.api_token), str(resp.token.token_id)


def revoke_token(srv: ChaosServer, tenant_id: str, token: str, token_id: str) -> bool:
    cls = getattr(pb, "RevokeTokenRequest", None)
    if cls is None:
        return False
    return _tokens_call(srv, token, "RevokeToken", cls(tenant_id=tenant_id, token_id=token_id)) is not None


def _enroll_key(ks: KeySet, srv: ChaosServer, n_bulk: int, n_single: int) -> None:
    """Register, bulk-enroll ``n_bulk``, then single enrollments (staged+folded, direct)."""
    with ks.client(srv.target) as c:
        c.register_key()
        c.enroll_many(ks.subjects[:n_bulk], ks.gallery[:n_bulk])
        for i in range(n_bulk, n_bulk + n_single):
            if i % 2:
                c.enroll(ks.subjects[i], ks.gallery[i], staged=False)
            else:
                c.enroll(ks.subjects[i], ks.gallery[i], fold="now")
        c.flush()
        info = {k.key_id: k for k in c.describe().keys}[ks.key_id]
        ks.g1, ks.n_ct, ks.capacity = int(info.probe_ciphertexts), int(info.n_ciphertexts), int(info.capacity)
        codec = ks.state.handles()
        ks.handles = [codec.encode(s) for s in ks.subjects]
        bins = c.transport.call(
            c.transport.enrollment.ListBins,
            pb.ListBinsRequest(tenant_id=ks.tenant_id, key_id=ks.key_id),
        )
        ks.bins = [(int(b.bin_id), int(b.version)) for b in bins.bins]


def _photo(srv: ChaosServer, tenant_id: str, token: str, handle: str, blob: bytes) -> str:
    t = Transport(srv.target, token=token)
    try:
        resp = t.call(
            t.photos.UploadPhoto,
            pb.UploadPhotoRequest(tenant_id=tenant_id, handle=handle, sealed_photo=blob, protection="blur"),
        )
        return str(resp.photo_id)
    finally:
        t.close()


def build_world(srv: ChaosServer, size: WorldSize, seed: int) -> World:
    """Create the three tenants, their keys and galleries; collect valid samples."""
    tokens = {t: _create_tenant(srv, t) for t in (TENANT_A, TENANT_B, TENANT_X)}
    dim = SyntheticFaces().dim
    specs = [
        ("a.k1", TENANT_A, size.gallery, size.single, 1),
        ("a.k2", TENANT_A, size.small, 0, 2),
        ("b.k1", TENANT_B, size.other, 2, 3),
        ("x.k1", TENANT_X, size.small, 2, 4),
        ("x.k2", TENANT_X, size.small // 2, 0, 5),
    ]
    keys: dict[str, KeySet] = {}
    for name, tenant, n_bulk, n_single, off in specs:
        first = keys.get(f"{name.split('.')[0]}.k1")
        state = (
            first.state.rotated(name.split(".")[1])
            if first is not None
            else TenantState.new(tenant, dim=dim)
        )
        gal, subjects, probes = _faces(n_bulk + n_single, seed * 100 + off)
        ks = KeySet(name, tenant, tokens[tenant], state, [f"{name}-{s}" for s in subjects], gal, probes)
        _enroll_key(ks, srv, n_bulk, n_single)
        keys[name] = ks
        log.info("set up %s: %d templates in %d bins", name, len(ks.subjects), len(ks.bins))

    sample_probes: dict[str, list[bytes]] = {}
    for name, ks in keys.items():
        with ks.client(srv.target) as c:
            sample_probes[name] = c.crypto.encrypt_probe(c.prepare_probe(ks.probes[0])[0])
    x = keys["x.k1"]
    with x.client(srv.target) as c:
        extra = _faces(8, seed * 100 + 9)[0]
        samples = Samples(
            probes=sample_probes,
            staged=c.crypto.encrypt_staged(c.prepare(extra[0])[0]),
            contribution=c.crypto.encrypt_contribution(c.prepare(extra[1:2]), [0]),
            bulk=c.crypto.encrypt_contribution(c.prepare(extra[2:6]), [0, 1, 2, 3]),
            context=x.state.keys().public_context_bytes(),
            photo_ids={},
        )
    rng = np.random.default_rng(seed)
    for tenant, name in ((TENANT_B, "b.k1"), (TENANT_X, "x.k1")):
        blob = rng.bytes(2048)
        samples.photo_ids[tenant] = _photo(srv, tenant, tokens[tenant], keys[name].handles[0], blob)
    # The legitimate kiosk has its own token (rate limits and revocation are
    # per token), with every scope: a query-only token is rate-limited, and
    # the point is to measure the server, not the limiter.
    legit = mint_token(srv, TENANT_A, tokens[TENANT_A], "chaos-legit", ["query", "enroll", "manage"])
    world = World(keys, tokens, srv.admin_token, legit[0] if legit else tokens[TENANT_A], samples)
    query = mint_token(srv, TENANT_X, tokens[TENANT_X], "chaos-x-query", ["query"])
    world.query_token = query[0] if query else None
    revoked = mint_token(srv, TENANT_X, tokens[TENANT_X], "chaos-x-revoked", ["query", "enroll", "manage"])
    if revoked and revoke_token(srv, TENANT_X, tokens[TENANT_X], revoked[1]):
        world.revoked_token = revoked[0]
    return world


# -- the oracle ---------------------------------------------------------------------


@dataclass
class ExactReport:
    checked: int = 0
    failures: list[dict[str, object]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.checked > 0 and not self.failures


def check_exact(
    srv: ChaosServer, world: World, *, per_key: int, seed: int, tie: float = 2e-3
) -> ExactReport:
    """Identify enrolled templates and second captures; compare with the plaintext search.

    For each checked key (a.k1, a.k2, b.k1), ``per_key`` subjects drawn with
    ``seed``: the enrolled template must identify as itself, and a second
    capture must give the plaintext top-1 (or a subject whose plaintext
    score is within ``tie`` of it: CKKS noise is ~1e-4), both with a score
    within 1e-2 of the plaintext cosine.
    """
    rng = np.random.default_rng(seed)
    report = ExactReport()
    for name in ("a.k1", "a.k2", "b.k1"):
        ks = world.key(name)
        picks = rng.choice(len(ks.subjects), size=min(per_key, len(ks.subjects)), replace=False)
        with ks.client(srv.target) as c:
            for i in picks.tolist():
                for kind, probe in (("template", ks.gallery[i]), ("capture", ks.probes[i])):
                    report.checked += 1
                    top, best, _ = ks.plaintext_top1(probe)
                    try:
                        r = c.identify(probe)
                    except VeilfaceError as exc:
                        report.failures.append({"key": name, "kind": kind, "error": type(exc).__name__})
                        continue
                    ok_subject = r.subject_id == ks.subjects[top]
                    if not ok_subject and r.subject_id in ks.subjects:
                        j = ks.subjects.index(r.subject_id)
                        g = ks.gallery[j] / np.linalg.norm(ks.gallery[j])
                        alt = float(g @ (np.asarray(probe) / np.linalg.norm(probe)))
                        ok_subject = best - alt <= tie
                    if not ok_subject or abs(r.score - best) > 1e-2:
                        report.failures.append(
                            {"key": name, "kind": kind, "expected_score": round(best, 4),
                             "score": round(float(r.score), 4), "right_subject": r.subject_id == ks.subjects[top]}
                        )
    return report
