"""Federated training across camera sites (Flower). Independent of the service.

Layout, one subpackage per task plus what the tasks share:

- :mod:`veilface.federated.server_app`, :mod:`veilface.federated.client_app`:
  the one Flower ServerApp / ClientApp pair; they dispatch on the run-config
  key ``task`` to :mod:`veilface.federated.vireid.flower` or
  :mod:`veilface.federated.pad.flower`.
- :mod:`veilface.federated.vireid`: visible-infrared ReID (data sets, model,
  LFW proxy, local training, strategy, Flower task, benchmark).
- :mod:`veilface.federated.pad`: rehearsal-free incremental PAD (data sets,
  prompted ViT, rendered-attack proxy, local training, pre-training, Flower
  task, benchmark).
- :mod:`veilface.federated.privacy`: DP wrappers and SecAgg+ for either task.
- :mod:`veilface.federated.deploy`: the local Deployment Engine harness (TLS,
  SuperNode keys, launcher app, processes).
- :mod:`veilface.federated.arrays`, :mod:`veilface.federated.metrics`,
  :mod:`veilface.federated.run_artifacts`: model state <-> numpy <->
  ``ArrayRecord``; ReID and PAD metrics; checkpoints, metrics files, plots.
- :mod:`veilface.federated.round_guard`: a round in which no client succeeded,
  or a model training never changed, fails the run with the clients' reasons.

Public names are imported from their submodule on first use, so ``import
veilface.federated`` loads neither torch nor flwr:

- :mod:`veilface.federated.metrics` (numpy): ReID retrieval metrics
  (Rank-k, mAP, mINP) and PAD metrics (HTER, APCER/BPCER/ACER, AUC, EER
  threshold, average forgetting).
- :mod:`veilface.federated.vireid.datasets` (stdlib + numpy): SYSU-MM01,
  RegDB and LLCM indexes with layout validation, query/gallery protocols.
- :mod:`veilface.federated.vireid.models` (torch): two-stream MobileNetV2
  ReID encoder, GeM, BN-neck, local identity classifier, ImageNet loader
  (MobileNetV2 itself is :mod:`veilface.nn.mobilenet`).
- :mod:`veilface.federated.pad.datasets` (stdlib): OULU-NPU, CASIA-FASD,
  Replay-Attack, MSU-MFSD and CelebA-Spoof indexes with layout/label checks.
- :mod:`veilface.federated.pad.models` (torch): CLIP-style ViT with universal
  and per-domain prompts, Selective EWC, CLIP weight loader.
- :mod:`veilface.federated.pad.proxy` (numpy + Pillow): the LFW-rendered
  incremental-PAD proxy and its check against real samples.
"""

from __future__ import annotations

if __name__ != "veilface.federated":  # ./federated/ found through a repository root on sys.path
    raise ImportError(
        f"{__name__!r} is veilface's federated package found by its folder name (the veilface "
        "repository root is on sys.path); import veilface.federated, or run from outside the "
        "repository root",
        name=__name__,
    )

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "PADErrorRates": "metrics",
    "RetrievalMetrics": "metrics",
    "acer": "metrics",
    "auc": "metrics",
    "average_forgetting": "metrics",
    "eer_threshold": "metrics",
    "evaluate_retrieval": "metrics",
    "hter": "metrics",
    "pad_error_rates": "metrics",
    "DatasetLayoutError": "vireid.datasets",
    "LLCM_LAYOUT": "vireid.datasets",
    "LabelMismatchError": "vireid.datasets",
    "Modality": "vireid.datasets",
    "REGDB_LAYOUT": "vireid.datasets",
    "ReIDSample": "vireid.datasets",
    "ReIDSplits": "vireid.datasets",
    "SYSU_INFRARED_CAMERAS": "vireid.datasets",
    "SYSU_LAYOUT": "vireid.datasets",
    "SYSU_VISIBLE_CAMERAS": "vireid.datasets",
    "load_llcm": "vireid.datasets",
    "load_regdb": "vireid.datasets",
    "load_sysu_mm01": "vireid.datasets",
    "relabel": "vireid.datasets",
    "sample_arrays": "vireid.datasets",
    "split_query_gallery": "vireid.datasets",
    "sysu_query_gallery": "vireid.datasets",
    "BNNeck": "vireid.models",
    "CheckpointError": "run_artifacts",
    "GeM": "vireid.models",
    "IMAGENET_MEAN": "vireid.models",
    "IMAGENET_STD": "vireid.models",
    "IdentityClassifier": "vireid.models",
    "MODALITIES": "vireid.models",
    "ReIDOutput": "vireid.models",
    "TwoStreamReID": "vireid.models",
    "load_imagenet_backbone": "vireid.models",
    "PADSample": "pad.datasets",
    "PADSplits": "pad.datasets",
    "load_oulu_npu": "pad.datasets",
    "load_casia_fasd": "pad.datasets",
    "load_replay_attack": "pad.datasets",
    "load_msu_mfsd": "pad.datasets",
    "load_celeba_spoof": "pad.datasets",
    "CLIPVisionConfig": "pad.models",
    "CLIPVisionTransformer": "pad.models",
    "PromptedPAD": "pad.models",
    "SelectiveEWC": "pad.models",
    "load_clip_visual": "pad.models",
    "PADProxy": "pad.proxy",
    "build_pad_proxy": "pad.proxy",
    "compare_with_real_samples": "pad.proxy",
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LLCM_LAYOUT",
    "MODALITIES",
    "REGDB_LAYOUT",
    "SYSU_INFRARED_CAMERAS",
    "SYSU_LAYOUT",
    "SYSU_VISIBLE_CAMERAS",
    "BNNeck",
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "CheckpointError",
    "DatasetLayoutError",
    "GeM",
    "IdentityClassifier",
    "LabelMismatchError",
    "Modality",
    "PADErrorRates",
    "PADProxy",
    "PADSample",
    "PADSplits",
    "PromptedPAD",
    "ReIDOutput",
    "ReIDSample",
    "ReIDSplits",
    "RetrievalMetrics",
    "SelectiveEWC",
    "TwoStreamReID",
    "acer",
    "auc",
    "average_forgetting",
    "build_pad_proxy",
    "compare_with_real_samples",
    "eer_threshold",
    "evaluate_retrieval",
    "hter",
    "load_casia_fasd",
    "load_celeba_spoof",
    "load_clip_visual",
    "load_imagenet_backbone",
    "load_llcm",
    "load_msu_mfsd",
    "load_oulu_npu",
    "load_regdb",
    "load_replay_attack",
    "load_sysu_mm01",
    "pad_error_rates",
    "relabel",
    "sample_arrays",
    "split_query_gallery",
    "sysu_query_gallery",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
