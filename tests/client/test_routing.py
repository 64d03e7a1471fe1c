"""IVF routing on seeded clustered data, keyed labels, decoys, persistence."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from veilface.client.routing import Router
from veilface.errors import InvalidArgument

KEY = bytes(range(32))
IDS, PER, D, K = 128, 12, 64, 8  # identities (true clusters), samples each, dim, lists
NOISE = 0.15


def _samples(centers: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = centers[truth] + rng.standard_normal((len(truth), D)) * (NOISE / np.sqrt(D))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IDS tight clusters of PER samples: (points [IDS*PER, D], truth [IDS*PER], centers)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((IDS, D))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = np.repeat(np.arange(IDS), PER)
    return _samples(centers, truth, rng), truth, centers


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _clusters()


@pytest.fixture(scope="module")
def router(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Router:
    return Router.train(data[0], nlist=K, label_key=KEY, seed=1)


def test_train_shapes(router: Router) -> None:
    assert router.centroids.shape == (K, D) and router.centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(router.centroids, axis=1), 1.0, atol=1e-5)
    assert router.nlist == K and router.dim == D and router.version == 1


def test_routing_finds_true_cluster(
    router: Router, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x, truth, centers = data
    assigned = router.assign(x)
    assert assigned.dtype == np.int64 and assigned.shape == (IDS * PER,)
    # The list of a true cluster is where most of its enrolled samples went ...
    majority = np.array(
        [np.bincount(assigned[truth == c], minlength=K).argmax() for c in range(IDS)]
    )
    assert (assigned == majority[truth]).mean() >= 0.99
    # ... and fresh samples of each cluster are routed to that list with nprobe=1.
    queries = _samples(centers, truth, np.random.default_rng(7))
    assert (router.probe_lists(queries, 1)[:, 0] == majority[truth]).mean() >= 0.99
    assert len(set(majority.tolist())) == K  # every list is used


def test_probe_lists_shapes(
    router: Router, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x = data[0]
    one = router.probe_lists(x[0], 3)
    many = router.probe_lists(x[:5], 3)
    assert one.shape == (3,) and one.dtype == np.int64
    assert many.shape == (5, 3) and many.dtype == np.int64
    assert np.array_equal(many[0], one)
    assert one[0] == router.assign(x[:1])[0]
    scores = router.centroids @ x[0]
    assert np.array_equal(one, np.argsort(-scores)[:3])
    for bad in (0, K + 1):
        with pytest.raises(InvalidArgument, match="nprobe"):
            router.probe_lists(x[0], bad)
    with pytest.raises(InvalidArgument, match="dimension"):
        router.assign(np.ones((2, D + 1)))


def test_train_errors(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    x = data[0]
    with pytest.raises(InvalidArgument, match="nlist"):
        Router.train(x[:5], nlist=6, label_key=KEY)
    with pytest.raises(InvalidArgument, match="nlist"):
        Router.train(x[:5], nlist=0, label_key=KEY)
    with pytest.raises(InvalidArgument, match="shape"):
        Router.train(x[0], nlist=1, label_key=KEY)
    with pytest.raises(InvalidArgument, match="all-zero"):
        Router.train(np.zeros((4, D)), nlist=1, label_key=KEY)
    with pytest.raises(InvalidArgument, match="label key"):
        Router.train(x, nlist=2, label_key=b"short")


def test_warns_on_few_points(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="veilface.client.routing"):
        Router.train(data[0][:100], nlist=4, label_key=KEY, niter=2)
    assert any("faiss advises" in r.getMessage() for r in caplog.records)


def test_labels(router: Router) -> None:
    lab = router.label(3)
    assert len(lab) == 32 and int(lab, 16) >= 0
    assert router.label(3) == lab
    same = Router(router.centroids.copy(), 1, KEY)
    assert same.label(3) == lab
    assert Router(router.centroids, 2, KEY).label(3) != lab
    assert Router(router.centroids, 1, bytes(32)).label(3) != lab
    assert len(set(router.labels(range(K)))) == K
    assert router.labels(np.array([3, 4])) == [lab, router.label(4)]
    with pytest.raises(InvalidArgument, match="out of range"):
        router.label(K)


def test_decoys(router: Router) -> None:
    rng = np.random.default_rng(0)
    real = [1, 4, 6]
    real_labels = set(router.labels(real))
    for _ in range(50):
        decoys = router.decoy_labels(real, 4, rng)
        assert len(decoys) == len(set(decoys)) == 4
        assert not real_labels & set(decoys)
    assert len(router.decoy_labels(real, K - 3)) == K - 3  # OS CSPRNG path
    assert router.decoy_labels(real, 0, rng) == []
    with pytest.raises(InvalidArgument, match="decoys"):
        router.decoy_labels(real, K - 2, rng)
    sent = router.query_labels(real, decoys=2, rng=rng)
    assert sent == sorted(sent) and len(sent) == 5 and real_labels <= set(sent)


def test_round_trip_dict(router: Router, data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    doc = json.loads(json.dumps(router.to_dict()))
    back = Router.from_dict(doc)
    assert np.array_equal(back.centroids, router.centroids)
    assert back.version == router.version and back.label_key == router.label_key
    assert back.labels(range(K)) == router.labels(range(K))
    assert np.array_equal(back.assign(data[0]), router.assign(data[0]))
    doc["centroids"]["shape"] = [K, D + 1]
    with pytest.raises(InvalidArgument):
        Router.from_dict(doc)
    with pytest.raises(InvalidArgument):
        Router.from_dict({"format": "veilface-router/1"})


def test_repr_hides_key(router: Router) -> None:
    assert "label_key" not in repr(router) and str(KEY) not in repr(router)
