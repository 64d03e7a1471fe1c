"""veilface.nn: torch-only networks shared by the client and the federated trainer."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_package_import_stays_light_and_exports_match() -> None:
    code = (
        "import sys, veilface.nn as n; "
        "assert 'torch' not in sys.modules; "
        "n.MobileNetV2; assert 'torch' in sys.modules; "
        "assert not any(m.startswith(('veilface.federated', 'veilface.client')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import veilface.nn as nn_pkg

    assert sorted(nn_pkg.__all__) == sorted(nn_pkg._EXPORTS)
    for name, module in nn_pkg._EXPORTS.items():
        assert name in importlib.import_module(f"veilface.nn.{module}").__all__
    with pytest.raises(AttributeError):
        nn_pkg.no_such_name  # noqa: B018


def test_client_surrogate_and_federated_encoder_share_one_mobilenet() -> None:
    pytest.importorskip("torch")
    from veilface.client.protect import surrogate_models
    from veilface.federated.vireid import models
    from veilface.nn.mobilenet import MobileNetV2

    assert surrogate_models.MobileNetV2 is MobileNetV2
    assert models.MobileNetV2 is MobileNetV2
