"""Server-side aggregation for federated VI-ReID: partial FedAvg plus prototype averaging.

:class:`PrototypeFedAvg` is a :class:`flwr.serverapp.strategy.FedAvg` whose
training round differs in two ways (after L2RW, arXiv 2503.12232):

1. **Partial averaging.** Clients send back only the encoder arrays they
   trained: identity classifiers never leave a site, and under camera
   isolation a site with only infrared cameras does not send the visible
   stem. Each array is the ``num-examples``-weighted mean over the replies
   that carry it; an array no reply carries keeps its global value.
2. **Server momentum** (optional, FedAvgM: Hsu et al. 2019, arXiv
   1909.06335). With ``server_momentum`` = beta > 0 the server keeps a
   velocity ``v <- beta * v + (mean - global)`` per floating-point weight and
   moves the global model by ``v`` instead of the plain mean step. Under
   camera isolation each round averages updates of sites that see different
   modalities, which shortens the step; the velocity carries the direction
   the rounds agree on. BatchNorm running statistics (and integer counters)
   are averaged plainly.
3. **Prototype averaging.** Each reply carries an ArrayRecord
   ``"prototypes"`` (``pids`` (n,), ``vectors`` (n, D), ``counts`` (n,)):
   the site's per-identity mean embeddings. The server averages them per
   identity (weighted by counts), re-normalises, and sends the global
   prototypes with the next round's training message.

What this reveals: per-identity mean embeddings and per-identity image
counts of every site, to the server (see ``docs/federated.md``).

Replies that carry an error (a client that crashed or dropped out) are
logged and left out; the round completes with the others. The round's
aggregated training metrics gain ``num-clients`` (replies used) and
``num-failures``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from veilface.federated.arrays import record_to_arrays

logger = logging.getLogger(__name__)

__all__ = ["PROTOTYPES_KEY", "PrototypeFedAvg", "prototypes_record", "read_prototypes"]

PROTOTYPES_KEY = "prototypes"


def prototypes_record(
    pids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32], counts: npt.NDArray[np.float32]
) -> ArrayRecord:
    """Pack prototypes (``(n,)`` int64, ``(n, D)`` float32, ``(n,)`` float32) into an ArrayRecord."""
    return ArrayRecord(
        {
            "pids": Array(np.asarray(pids, dtype=np.int64)),
            "vectors": Array(np.asarray(vectors, dtype=np.float32)),
            "counts": Array(np.asarray(counts, dtype=np.float32)),
        }
    )


def read_prototypes(
    record: ArrayRecord | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Unpack :func:`prototypes_record`; an absent or empty record gives empty arrays."""
    if record is None or "pids" not in record:
        return (
            np.zeros(0, np.int64),
            np.zeros((0, 0), np.float32),
            np.zeros(0, np.float32),
        )
    pids = record["pids"].numpy().astype(np.int64)
    vectors = record["vectors"].numpy().astype(np.float32)
    counts = record["counts"].numpy().astype(np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != pids.shape[0] or counts.shape != pids.shape:
        raise ValueError(
            f"malformed prototypes: pids {pids.shape}, vectors {vectors.shape}, counts {counts.shape}"
        )
    return pids, vectors, counts


class PrototypeFedAvg(FedAvg):
    """FedAvg over the arrays each client returns, plus identity-prototype averaging.

    Parameters
    ----------
    server_momentum : float, keyword-only
        FedAvgM's beta in ``[0, 1)``; 0 (default) is the plain mean.
    **kwargs
        :class:`~flwr.serverapp.strategy.FedAvg`'s keyword arguments
        (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``, ...).
    """

    def __init__(self, *, server_momentum: float = 0.0, **kwargs: object) -> None:
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.server_momentum = float(server_momentum)
        self.velocity: dict[str, npt.NDArray[np.float64]] = {}
        self.global_arrays: dict[str, npt.NDArray[np.generic]] = {}
        self.prototypes: ArrayRecord = prototypes_record(
            np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each also carrying the global prototypes."""
        self.global_arrays = record_to_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            msg.content[PROTOTYPES_KEY] = self.prototypes
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Per-array weighted mean over the replies holding it; prototypes per identity."""
        valid: list[RecordDict] = []
        failures = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                logger.warning(
                    "round %d: node %d failed (%s); aggregating the others",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            content = msg.content
            if self.arrayrecord_key not in content.array_records or not content.metric_records:
                logger.warning(
                    "round %d: node %d replied without arrays/metrics; ignored",
                    server_round,
                    msg.metadata.src_node_id,
                )
                failures += 1
                continue
            valid.append(content)
        logger.info("round %d: %d usable training replies", server_round, len(valid))
        if not valid:
            return None, None
        weights = [
            float(next(iter(c.metric_records.values()))[self.weighted_by_key])  # type: ignore[arg-type]
            for c in valid
        ]
        sums: dict[str, npt.NDArray[np.float64]] = {}
        totals: dict[str, float] = {}
        for content, w in zip(valid, weights):
            for key, arr in content.array_records[self.arrayrecord_key].items():
                value = arr.numpy().astype(np.float64)
                if key in sums:
                    if sums[key].shape != value.shape:
                        logger.warning("array %s: shape %s differs; ignored", key, value.shape)
                        continue
                    sums[key] += w * value
                else:
                    sums[key] = w * value
                totals[key] = totals.get(key, 0.0) + w
        out: dict[str, Array] = {}
        keys = list(self.global_arrays) or list(sums)
        for key in keys:
            base = self.global_arrays.get(key)
            if key in sums and totals[key] > 0:
                mean = sums[key] / totals[key]
                dtype = base.dtype if base is not None else np.float32
                if np.issubdtype(dtype, np.integer):
                    mean = np.rint(mean)
                elif base is not None and _has_momentum(key, self.server_momentum):
                    prev = base.astype(np.float64)
                    vel = self.velocity.get(key)
                    vel = mean - prev if vel is None else self.server_momentum * vel + mean - prev
                    self.velocity[key] = vel
                    mean = prev + vel
                out[key] = Array(np.asarray(mean, dtype=dtype))
            elif base is not None:
                out[key] = Array(np.asarray(base))
        self._aggregate_prototypes(valid)
        metrics = self.train_metrics_aggr_fn(
            [_metrics_only(c) for c in valid], self.weighted_by_key
        )
        if metrics is not None:
            metrics["num-clients"] = float(len(valid))
            metrics["num-failures"] = float(failures)
        return ArrayRecord(out), metrics

    def _aggregate_prototypes(self, valid: list[RecordDict]) -> None:
        acc: dict[int, npt.NDArray[np.float64]] = {}
        cnt: dict[int, float] = {}
        for content in valid:
            record = content.array_records.get(PROTOTYPES_KEY)
            try:
                pids, vectors, counts = read_prototypes(record)
            except ValueError as exc:
                logger.warning("ignoring prototypes: %s", exc)
                continue
            for pid, vec, c in zip(pids.tolist(), vectors, counts.tolist()):
                if pid in acc and acc[pid].shape != vec.shape:
                    continue
                acc[pid] = acc.get(pid, 0.0) + c * vec.astype(np.float64)
                cnt[pid] = cnt.get(pid, 0.0) + c
        if not acc:
            return
        order = sorted(acc)
        vecs = np.stack([acc[p] / max(cnt[p], 1e-12) for p in order])
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        self.prototypes = prototypes_record(
            np.asarray(order, np.int64),
            vecs.astype(np.float32),
            np.asarray([cnt[p] for p in order], np.float32),
        )
        logger.info("global prototypes: %d identities", len(order))


def _has_momentum(key: str, beta: float) -> bool:
    """Momentum applies to learned weights, not to BatchNorm running statistics."""
    return beta > 0 and not key.endswith(("running_mean", "running_var"))


def _metrics_only(content: RecordDict) -> RecordDict:
    return RecordDict({k: v for k, v in content.metric_records.items()})
