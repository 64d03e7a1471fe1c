"""Model state <-> numpy arrays <-> Flower ``ArrayRecord``: the one place the tasks convert.

- :func:`state_arrays`: ``module.state_dict()`` as numpy arrays (copies), in
  the model's own dtypes or cast to one (PAD sends float32 throughout).
- :func:`load_state_arrays`: numpy arrays back into a module by name; names
  the arrays do not hold keep their values; unknown names and other shapes
  are refused.
- :func:`arrays_to_record` / :func:`record_to_arrays`: numpy arrays <-> an
  ``ArrayRecord`` (what Flower messages and strategies carry).

A model-specific loader may add its own checks on top (the PAD model grows
its domains first and wants every array:
:func:`veilface.federated.pad.models.numpy_to_state`).

Only numpy is imported with this module; torch and flwr are imported by the
functions that need them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

from veilface.errors import InvalidArgument

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from torch import nn

__all__ = ["arrays_to_record", "load_state_arrays", "record_to_arrays", "state_arrays"]

_S = TypeVar("_S", bound=np.generic)


@overload
def state_arrays(
    module: nn.Module, *, dtype: None = None
) -> dict[str, npt.NDArray[np.generic]]: ...
@overload
def state_arrays(module: nn.Module, *, dtype: type[_S]) -> dict[str, npt.NDArray[_S]]: ...
def state_arrays(
    module: nn.Module, *, dtype: type[np.generic] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """``module.state_dict()`` as numpy arrays (copies).

    Parameters
    ----------
    module : torch.nn.Module
        Any module; its tensors are moved to the CPU.
    dtype : numpy scalar type, optional, keyword-only
        Cast every array to it (e.g. ``np.float32``); default: each tensor's own dtype.

    Returns
    -------
    dict of str to numpy.ndarray
        One array per ``state_dict`` entry, same names and shapes.
    """
    out: dict[str, npt.NDArray[Any]] = {}
    for key, value in module.state_dict().items():
        array = value.detach().cpu().numpy()
        out[key] = array.copy() if dtype is None else array.astype(dtype)
    return out


def load_state_arrays(module: nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Load numpy arrays into ``module``; keys missing from ``arrays`` keep their values.

    Raises
    ------
    InvalidArgument
        Unknown keys or shape mismatches (arrays from another model).
    """
    import torch

    own = module.state_dict()
    unknown = sorted(set(arrays) - set(own))
    if unknown:
        raise InvalidArgument(
            f"{len(unknown)} arrays do not belong to this model (e.g. {unknown[:3]}); "
            "server and clients must use the same model configuration"
        )
    fixed: dict[str, npt.NDArray[np.generic]] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if own[key].ndim == 0 and value.size == 1:  # transports may turn 0-d into (1,)
            value = value.reshape(())
        fixed[key] = value
        if tuple(own[key].shape) != tuple(value.shape):
            raise InvalidArgument(
                f"array {key} has shape {np.shape(value)}, the model expects "
                f"{tuple(own[key].shape)}; server and clients must use the same configuration"
            )
    module.load_state_dict({k: torch.from_numpy(v) for k, v in fixed.items()}, strict=False)


def arrays_to_record(arrays: Mapping[str, npt.NDArray[np.generic]]) -> ArrayRecord:
    """Numpy arrays as an ``ArrayRecord`` (C-contiguous copies where needed), same names."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


@overload
def record_to_arrays(
    record: ArrayRecord, *, dtype: None = None
) -> dict[str, npt.NDArray[np.generic]]: ...
@overload
def record_to_arrays(record: ArrayRecord, *, dtype: type[_S]) -> dict[str, npt.NDArray[_S]]: ...
def record_to_arrays(
    record: ArrayRecord, *, dtype: type[np.generic] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """An ``ArrayRecord`` as numpy arrays, same names; cast to ``dtype`` when given."""
    if dtype is None:
        return {k: v.numpy() for k, v in record.items()}
    return {k: np.asarray(v.numpy(), dtype=dtype) for k, v in record.items()}
