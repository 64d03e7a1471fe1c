"""Metrics against small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from veilface.errors import InvalidArgument
from veilface.federated.metrics import (
    acer,
    auc,
    average_forgetting,
    eer_threshold,
    evaluate_retrieval,
    hter,
    pad_error_rates,
)

# Gallery: g0 pid1 cam1, g1 pid2 cam1, g2 pid1 cam2, g3 pid3 cam1, g4 pid1 cam3
G_PIDS = [1, 2, 1, 3, 1]
G_CAMS = [1, 1, 2, 1, 3]
# q0 pid1 cam3, q1 pid2 cam6, q2 pid9 cam3 (absent from the gallery)
Q_PIDS = [1, 2, 9]
Q_CAMS = [3, 6, 3]
DIST = np.array(
    [
        [0.5, 0.1, 0.3, 0.9, 0.0],  # order g4 g1 g2 g0 g3
        [0.2, 0.4, 0.1, 0.3, 0.5],  # order g2 g0 g3 g1 g4
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ]
)


def test_retrieval_standard_protocol_by_hand() -> None:
    # q0: g4 removed (same pid, same cam) -> g1 x, g2 v, g0 v, g3 x
    #     AP = (1/2 + 2/3) / 2 = 7/12, INP = 2/3, first match at rank 2
    # q1: g2 x, g0 x, g3 x, g1 v, g4 x -> AP = 1/4, INP = 1/4, rank 4
    # q2: no match, skipped
    m = evaluate_retrieval(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    assert m.num_queries == 3 and m.num_valid_queries == 2
    assert m.rank1 == 0.0
    assert m.rank5 == 1.0 and m.rank10 == 1.0
    np.testing.assert_allclose(m.cmc[:5], [0.0, 0.5, 0.5, 1.0, 1.0])
    assert m.map == pytest.approx(5 / 12)
    assert m.minp == pytest.approx(11 / 24)
    assert m.cmc.shape == (20,)
    assert set(m.as_dict()) == {"rank1", "rank5", "rank10", "map", "minp"}


def test_retrieval_sysu_protocol_drops_camera2_for_camera3_queries() -> None:
    # q0 (cam 3): g4 and g2 (cam 2) removed -> g1 x, g0 v, g3 x: AP 1/2, INP 1/2
    m = evaluate_retrieval(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, protocol="sysu")
    assert m.map == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m.minp == pytest.approx((1 / 2 + 1 / 4) / 2)
    np.testing.assert_allclose(m.cmc[:4], [0.0, 0.5, 0.5, 1.0])


def test_retrieval_perfect_and_ties_are_stable() -> None:
    g = np.array([1, 1, 2, 2])
    dist = np.array([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    m = evaluate_retrieval(dist, [1, 2], g, [2, 2], [1, 1, 1, 1], max_rank=3)
    assert (m.rank1, m.map, m.minp) == (1.0, 1.0, 1.0)
    assert m.cmc.shape == (3,)
    # small gallery: Rank-10 saturates
    assert m.rank10 == 1.0


def test_retrieval_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="shape"):
        evaluate_retrieval(DIST, Q_PIDS[:2], G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(InvalidArgument, match="no query"):
        evaluate_retrieval(DIST, [7, 8, 9], G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(InvalidArgument, match="NaN"):
        evaluate_retrieval(np.full((3, 5), np.nan), Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(InvalidArgument, match="protocol"):
        evaluate_retrieval(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, protocol="market")
    with pytest.raises(InvalidArgument, match="integers"):
        evaluate_retrieval(DIST, [1.5, 2.0, 3.0], G_PIDS, Q_CAMS, G_CAMS)


# live 0.9 0.8 0.4 | attacks 0.7 (print) 0.3 0.2 (replay)
SCORES = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
LABELS = [1, 1, 1, 0, 0, 0]
SPECIES = ["", "", "", "print", "replay", "replay"]


def test_hter_by_hand() -> None:
    # threshold 0.5: FAR = 1/3 (0.7 accepted), FRR = 1/3 (0.4 rejected)
    assert hter(SCORES, LABELS, 0.5) == pytest.approx(1 / 3)
    assert hter(SCORES, LABELS, 0.75) == pytest.approx((0 + 1 / 3) / 2)
    assert hter([1.0, 0.0], [1, 0], 0.5) == 0.0


def test_eer_threshold_by_hand() -> None:
    # at 0.7: FAR = 1/3, FRR = 1/3
    assert eer_threshold(SCORES, LABELS) == pytest.approx(0.7)
    # separable: the lowest bona fide score gives FAR = FRR = 0
    assert eer_threshold([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx(0.8)


def test_apcer_is_the_worst_species_and_acer() -> None:
    rates = pad_error_rates(SCORES, LABELS, 0.5, attack_species=SPECIES)
    assert rates.apcer_per_species == {"print": 1.0, "replay": 0.0}
    assert rates.apcer == 1.0
    assert rates.bpcer == pytest.approx(1 / 3)
    assert rates.acer == pytest.approx(2 / 3)
    assert acer(1.0, 1 / 3) == pytest.approx(2 / 3)
    pooled = pad_error_rates(SCORES, LABELS, 0.5)
    assert pooled.apcer == pytest.approx(1 / 3)
    with pytest.raises(InvalidArgument):
        acer(1.5, 0.0)


def test_auc_by_hand_and_ties() -> None:
    # 9 live/attack pairs; only (0.4, 0.7) is misordered
    assert auc(SCORES, LABELS) == pytest.approx(8 / 9)
    assert auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert auc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert auc([0.0, 1.0], [1, 0]) == 0.0


def test_pad_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="both"):
        hter([0.1, 0.2], [1, 1], 0.5)
    with pytest.raises(InvalidArgument, match="labels"):
        auc([0.1, 0.2], [1, 2])
    with pytest.raises(InvalidArgument, match="equal length"):
        auc([0.1, 0.2], [1])
    with pytest.raises(InvalidArgument, match="NaN"):
        eer_threshold([math.nan, 0.2], [1, 0])


def test_average_forgetting_accuracy_and_hter() -> None:
    nan = math.nan
    acc = [[0.7, nan, nan], [0.9, 0.8, nan], [0.6, 0.75, 0.85]]
    # best: task0 0.9 - 0.6 = 0.3; task1 0.8 - 0.75 = 0.05
    assert average_forgetting(acc) == pytest.approx(0.175)
    # after learning: task0 0.7 - 0.6 = 0.1; task1 0.05
    assert average_forgetting(acc, reference="after_learning") == pytest.approx(0.075)
    hters = [[0.1, nan, nan], [0.2, 0.05, nan], [0.3, 0.1, 0.02]]
    # task0: 0.3 - min(0.1, 0.2) = 0.2; task1: 0.1 - 0.05 = 0.05
    assert average_forgetting(hters, higher_is_better=False) == pytest.approx(0.125)
    # improvement is negative forgetting (backward transfer)
    assert average_forgetting(
        [[0.5, nan], [0.7, 0.9]], reference="after_learning"
    ) == pytest.approx(-0.2)
    assert average_forgetting([[0.4]]) == 0.0
    with pytest.raises(InvalidArgument, match="square"):
        average_forgetting([[0.1, 0.2]])
    with pytest.raises(InvalidArgument, match="diagonal"):
        average_forgetting([[0.1, nan], [nan, 0.2]])
