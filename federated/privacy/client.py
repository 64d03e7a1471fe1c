"""Client side of the privacy options: one ClientApp mod, inert unless the server asks.

The ClientApp is constructed with ``mods=client_mods()``; :func:`privacy_mod`
clips when the DP wrapper put the clipping norm into the train config, and
runs SecAgg+ when the protocol's stage messages arrive, so the client needs
no configuration of its own.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from veilface.federated.privacy.config import PrivacyConfigError
from veilface.federated.privacy.secagg import ARRAY_KEYS, WEIGHT_KEY

__all__ = ["client_mods", "privacy_mod"]

# Keys used by Flower itself (flwr.common.secure_aggregation / flwr.supercore).
_SECAGG_CONFIGS = "secaggplus_configs"
_KEY_CLIPPING_NORM = "clipping_norm"


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client mod applying whatever privacy the server asked for on train messages.

    - SecAgg+ stage messages (config record ``secaggplus_configs``): Flower's
      ``secaggplus_mod`` runs the protocol; in the masked-vector stage it calls
      the app through a translator (legacy ``fitins.*`` -> ``"arrays"`` /
      ``"config"``, reply -> ``fitres.*``), clipping first when asked.
    - Train messages whose config holds ``clipping_norm`` (set by
      ``DifferentialPrivacyClientSideFixedClipping``): Flower's
      ``fixedclipping_mod``.
    - Anything else passes through untouched.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if _SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, _legacy_bridge(call_next))
    if _wants_clipping(msg):
        return _fixed_clipping(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def client_mods() -> list[Mod]:
    """Mods for ``ClientApp(mods=...)``: just :func:`privacy_mod`."""
    return [privacy_mod]


def _fixed_clipping(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod``, safe for integer arrays.

    Flower clips in place (``array *= factor``), which numpy refuses for
    integer arrays such as BatchNorm's ``num_batches_tracked``. Integer arrays
    are handed to the mod as float64 (in the received model and in the
    reply); after clipping, the reply's integer arrays get their dtype back
    (rounded).
    """
    _floatify(msg)
    reply_dtypes: dict[str, np.dtype[Any]] = {}

    def inner(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error():
            reply_dtypes.update(_floatify(reply))
        return reply

    out = fixedclipping_mod(msg, ctxt, inner)
    if reply_dtypes and not out.has_error() and len(out.content.array_records) == 1:
        key, record = next(iter(out.content.array_records.items()))
        restored = {}
        for name, arr in record.items():
            value = arr.numpy()
            if name in reply_dtypes:
                value = np.rint(value).astype(reply_dtypes[name])
            restored[name] = Array(np.ascontiguousarray(value))
        out.content.array_records[key] = ArrayRecord(restored)
    return out


def _floatify(msg: Message) -> dict[str, np.dtype[Any]]:
    """Turn integer arrays of the message's ArrayRecords into float64; return their dtypes."""
    changed: dict[str, np.dtype[Any]] = {}
    for key, record in list(msg.content.array_records.items()):
        values = {name: arr.numpy() for name, arr in record.items()}
        ints = {n for n, v in values.items() if np.issubdtype(v.dtype, np.integer)}
        if not ints:
            continue
        changed.update({n: values[n].dtype for n in ints})
        msg.content.array_records[key] = ArrayRecord(
            {
                n: Array(v.astype(np.float64) if n in ints else np.ascontiguousarray(v))
                for n, v in values.items()
            }
        )
    return changed


def _wants_clipping(msg: Message) -> bool:
    return any(_KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values())


def _legacy_bridge(call_next: ClientAppCallable) -> ClientAppCallable:
    """Translate SecAgg+'s legacy FitIns/FitRes records to the app's Message API."""

    def bridge(msg: Message, ctxt: Context) -> Message:
        content = msg.content
        legacy_arrays = content.array_records["fitins.parameters"]
        config = ConfigRecord(dict(content.config_records["fitins.config"]))
        weight_key = str(config.pop(WEIGHT_KEY, "num-examples"))
        keys = [str(k) for k in cast(list[str], config.pop(ARRAY_KEYS, []))]
        if len(keys) != len(legacy_arrays):
            keys = list(legacy_arrays.keys())
        arrays = ArrayRecord(dict(zip(keys, legacy_arrays.values(), strict=True)))
        msg.content = RecordDict({"arrays": arrays, "config": config})
        if _KEY_CLIPPING_NORM in config:
            reply = _fixed_clipping(msg, ctxt, call_next)
        else:
            reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        out = reply.content
        if len(out.array_records) != 1 or len(out.metric_records) != 1:
            raise PrivacyConfigError(
                "SecAgg+ needs a train reply with exactly one ArrayRecord and one "
                f"MetricRecord, got {len(out.array_records)} and {len(out.metric_records)}"
            )
        metrics = next(iter(out.metric_records.values()))
        if weight_key not in metrics:
            raise PrivacyConfigError(
                f"SecAgg+ needs the client weight {weight_key!r} in the train reply's metrics"
            )
        legacy = RecordDict(
            {
                "fitres.parameters": next(iter(out.array_records.values())),
                "fitres.num_examples": MetricRecord(
                    {"num_examples": int(cast(float, metrics[weight_key]))}
                ),
                "fitres.metrics": ConfigRecord(
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                ),
                "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
            }
        )
        return Message(legacy, reply_to=msg)

    return bridge
