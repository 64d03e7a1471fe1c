"""Typed privacy options of the federated apps, parsed from the Flower run config.

Everything is driven by run-config keys (``[tool.flwr.app.config]`` or
``flwr run . --run-config "dp-mode='client' dp-clip-norm=0.5 secagg=true"``),
parsed into one typed :class:`PrivacyConfig`:

====================================  =========  ==============================================
key                                   default    meaning
====================================  =========  ==============================================
``dp-mode``                           ``"off"``  ``"off"``, ``"client"`` (client-side fixed
                                                 clipping) or ``"server"`` (server-side fixed
                                                 clipping); central Gaussian noise either way
``dp-clip-norm``                      ``1.0``    L2 bound on each client's update (new - old)
``dp-noise-multiplier``               ``1.0``    noise stdv = multiplier * clip / n_sampled
``dp-sampled-clients``                ``0``      clients per round the noise is calibrated
                                                 for; ``0`` = the number the task passes
``secagg``                            ``false``  run SecAgg+ on every training round
``secagg-shares``                     ``1.0``    key shares per client (int > 2, or a
                                                 fraction of the sampled clients)
``secagg-threshold``                  ``0.5``    shares needed to reconstruct (int, or a
                                                 fraction of ``secagg-shares``)
``secagg-clipping-range``             ``8.0``    parameters are clipped to +-range before
                                                 quantisation
``secagg-quantization-range``         ``2**22``  integer levels of the quantiser
``secagg-max-weight``                 ``1000.0`` largest per-client weight (num-examples)
====================================  =========  ==============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from veilface.errors import InvalidArgument

__all__ = ["DP_MODES", "DpMode", "PrivacyConfig", "PrivacyConfigError"]

DpMode = Literal["off", "client", "server"]
DP_MODES: tuple[str, ...] = ("off", "client", "server")


class PrivacyConfigError(InvalidArgument):
    """A privacy run-config key has a value that cannot work."""


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Typed privacy options (see the module docstring for the run-config keys).

    Attributes
    ----------
    dp_mode : {"off", "client", "server"}
        Which Flower DP wrapper to apply to the strategy.
    dp_clip_norm : float
        L2 clipping norm of one client's model update, > 0.
    dp_noise_multiplier : float
        Gaussian noise multiplier, >= 0 (0 = clipping only, no privacy from noise).
    dp_sampled_clients : int
        Clients per round the noise is calibrated for; 0 = use the task's number.
    secagg : bool
        Run SecAgg+ on every training round.
    secagg_shares : int | float
        Shares of each client's secret; int > 2 or a fraction in (0, 1].
    secagg_threshold : int | float
        Shares required to reconstruct; int >= 2 or a fraction in (0, 1].
    secagg_clipping_range : float
        Parameters are clipped to [-range, range] before quantisation.
    secagg_quantization_range : int
        Number of integer levels of the quantiser.
    secagg_max_weight : float
        Largest client weight (``num-examples``) that quantises without overflow.
    """

    dp_mode: DpMode = "off"
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_sampled_clients: int = 0
    secagg: bool = False
    secagg_shares: int | float = 1.0
    secagg_threshold: int | float = 0.5
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 1000.0

    def __post_init__(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise PrivacyConfigError(f"dp-mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        if not self.dp_clip_norm > 0:
            raise PrivacyConfigError(
                f"dp-clip-norm must be > 0, got {self.dp_clip_norm}; it bounds the L2 norm "
                "of one client's update, e.g. dp-clip-norm=1.0"
            )
        if not self.dp_noise_multiplier >= 0:
            raise PrivacyConfigError(
                f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}"
            )
        if self.dp_sampled_clients < 0:
            raise PrivacyConfigError(
                f"dp-sampled-clients must be >= 0 (0 = the task's count), "
                f"got {self.dp_sampled_clients}"
            )
        if self.secagg and self.dp_mode == "server":
            raise PrivacyConfigError(
                "dp-mode='server' clips each client's update on the server, which SecAgg+ "
                "hides by design; use dp-mode='client' together with secagg=true"
            )
        _check_share_param("secagg-shares", self.secagg_shares, int_min=3)
        _check_share_param("secagg-threshold", self.secagg_threshold, int_min=2)
        if (
            isinstance(self.secagg_shares, int)
            and isinstance(self.secagg_threshold, int)
            and self.secagg_threshold >= self.secagg_shares
        ):
            raise PrivacyConfigError(
                f"secagg-threshold ({self.secagg_threshold}) must be less than "
                f"secagg-shares ({self.secagg_shares})"
            )
        if not self.secagg_clipping_range > 0:
            raise PrivacyConfigError("secagg-clipping-range must be > 0")
        if not 0 < self.secagg_quantization_range < 2**32:
            raise PrivacyConfigError("secagg-quantization-range must be in (0, 2**32)")
        if not self.secagg_max_weight > 0:
            raise PrivacyConfigError("secagg-max-weight must be > 0")

    @property
    def enabled(self) -> bool:
        """True when any privacy option is on."""
        return self.dp_mode != "off" or self.secagg

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> PrivacyConfig:
        """Parse the privacy keys of a Flower run config (other keys are ignored).

        Raises
        ------
        PrivacyConfigError
            A key has the wrong type or an impossible value; the message names the key.
        """
        defaults = cls()
        mode = str(run_config.get("dp-mode", defaults.dp_mode)).strip().lower()
        if mode not in DP_MODES:
            raise PrivacyConfigError(f"dp-mode must be one of {DP_MODES}, got {mode!r}")
        return cls(
            dp_mode=cast(DpMode, mode),
            dp_clip_norm=_as_float(run_config, "dp-clip-norm", defaults.dp_clip_norm),
            dp_noise_multiplier=_as_float(
                run_config, "dp-noise-multiplier", defaults.dp_noise_multiplier
            ),
            dp_sampled_clients=_as_int(
                run_config, "dp-sampled-clients", defaults.dp_sampled_clients
            ),
            secagg=_as_bool(run_config, "secagg", defaults.secagg),
            secagg_shares=_as_share(run_config, "secagg-shares", defaults.secagg_shares),
            secagg_threshold=_as_share(run_config, "secagg-threshold", defaults.secagg_threshold),
            secagg_clipping_range=_as_float(
                run_config, "secagg-clipping-range", defaults.secagg_clipping_range
            ),
            secagg_quantization_range=_as_int(
                run_config, "secagg-quantization-range", defaults.secagg_quantization_range
            ),
            secagg_max_weight=_as_float(
                run_config, "secagg-max-weight", defaults.secagg_max_weight
            ),
        )


def _check_share_param(name: str, value: float, *, int_min: int) -> None:
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):
        if value < int_min and value != 1:
            raise PrivacyConfigError(
                f"{name} as an integer must be >= {int_min}, got {value}; "
                "or give a fraction such as 0.5"
            )
    elif not 0 < value <= 1:
        raise PrivacyConfigError(f"{name} as a fraction must be in (0, 1], got {value}")


def _get(run_config: Mapping[str, Any], key: str, default: Any) -> Any:
    return run_config.get(key, default)


def _as_float(run_config: Mapping[str, Any], key: str, default: float) -> float:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}") from exc


def _as_int(run_config: Mapping[str, Any], key: str, default: int) -> int:
    value = _get(run_config, key, default)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise PrivacyConfigError(f"{key} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyConfigError(f"{key} must be an integer, got {value!r}") from exc


def _as_bool(run_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off", ""}:
        return False
    raise PrivacyConfigError(f"{key} must be true or false, got {value!r}")


def _as_share(run_config: Mapping[str, Any], key: str, default: float) -> int | float:
    value = _get(run_config, key, default)
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError as exc:
        raise PrivacyConfigError(f"{key} must be an integer or a fraction, got {value!r}") from exc
