"""Strategy wrappers the privacy options build on: delegation and the one-record guard.

Flower's ``fixedclipping_mod`` and SecAgg+ handle train messages with exactly
one ``ArrayRecord`` and one ``ConfigRecord`` (FedAvg's ``"arrays"`` /
``"config"``); :class:`SingleRecordGuard` fails a run at once, with the fix,
when a strategy sends anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from veilface.federated.privacy.config import PrivacyConfigError

__all__ = ["Delegating", "SingleRecordGuard", "check_train_content", "strategy_weight_key"]


def check_train_content(content: RecordDict, sender: str = "the strategy") -> None:
    """Raise unless ``content`` has one ArrayRecord and one ConfigRecord.

    That is the layout Flower's ``fixedclipping_mod`` and SecAgg+ handle
    (FedAvg's ``"arrays"``/``"config"``).

    Raises
    ------
    PrivacyConfigError
        With the counts found and how to fix it.
    """
    n_arrays = len(content.array_records)
    n_configs = len(content.config_records)
    if n_arrays != 1 or n_configs != 1:
        raise PrivacyConfigError(
            f"dp-mode/secagg need train messages with one ArrayRecord and one "
            f"ConfigRecord; {sender} sends {n_arrays} and {n_configs}. Use a plain "
            "FedAvg strategy (vireid: method='fedavg'; pad: pad-method='naive') or turn "
            "the privacy options off"
        )


class Delegating(Strategy):
    """A strategy wrapper: every call goes to ``self.strategy`` unless a subclass overrides it."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __repr__(self) -> str:
        """The wrapped strategy's representation."""
        return repr(self.strategy)

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)


class SingleRecordGuard(Delegating):
    """Delegates to ``strategy``; refuses train messages Flower's privacy code cannot handle.

    ``fixedclipping_mod`` and SecAgg+ work on exactly one ArrayRecord and one
    ConfigRecord per train message (e.g. FedAvg's ``"arrays"``/``"config"``).
    A strategy that sends more (prototypes, partial models) would have every
    client reply with an error; this fails the run once, with the fix.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.weighted_by_key = strategy_weight_key(strategy)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then check every message's record layout."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            check_train_content(msg.content, type(self.strategy).__name__)
        return messages


def strategy_weight_key(strategy: Strategy) -> str:
    """``weighted_by_key`` of ``strategy`` or of the first strategy it wraps that has one."""
    inner: Any = strategy
    while not hasattr(inner, "weighted_by_key") and hasattr(inner, "strategy"):
        inner = inner.strategy
    return str(getattr(inner, "weighted_by_key", "num-examples"))
