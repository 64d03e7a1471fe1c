"""Federated training across camera sites (Flower). Independent of the service.

Public names are imported from their submodule on first use, so ``import
veilface.federated`` loads neither torch nor flwr:

- :mod:`veilface.federated.metrics` (numpy): ReID retrieval metrics
  (Rank-k, mAP, mINP) and PAD metrics (HTER, APCER/BPCER/ACER, AUC, EER
  threshold, average forgetting).
- :mod:`veilface.federated.datasets_vireid` (stdlib + numpy): SYSU-MM01,
  RegDB and LLCM indexes with layout validation, query/gallery protocols.
- :mod:`veilface.federated.models_vireid` (torch): two-stream MobileNetV2
  ReID encoder, GeM, BN-neck, local identity classifier, ImageNet loader
  (MobileNetV2 itself is :mod:`veilface.nn.mobilenet`).
- :mod:`veilface.federated.datasets_pad` (stdlib): OULU-NPU, CASIA-FASD,
  Replay-Attack, MSU-MFSD and CelebA-Spoof indexes with layout/label checks.
- :mod:`veilface.federated.models_pad` (torch): CLIP-style ViT with universal
  and per-domain prompts, Selective EWC, CLIP weight loader.
- :mod:`veilface.federated.proxy_pad` (numpy + Pillow): the LFW-rendered
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
    "DatasetLayoutError": "datasets_vireid",
    "LLCM_LAYOUT": "datasets_vireid",
    "LabelMismatchError": "datasets_vireid",
    "Modality": "datasets_vireid",
    "REGDB_LAYOUT": "datasets_vireid",
    "ReIDSample": "datasets_vireid",
    "ReIDSplits": "datasets_vireid",
    "SYSU_INFRARED_CAMERAS": "datasets_vireid",
    "SYSU_LAYOUT": "datasets_vireid",
    "SYSU_VISIBLE_CAMERAS": "datasets_vireid",
    "load_llcm": "datasets_vireid",
    "load_regdb": "datasets_vireid",
    "load_sysu_mm01": "datasets_vireid",
    "relabel": "datasets_vireid",
    "sample_arrays": "datasets_vireid",
    "split_query_gallery": "datasets_vireid",
    "sysu_query_gallery": "datasets_vireid",
    "BNNeck": "models_vireid",
    "CheckpointError": "run_artifacts",
    "GeM": "models_vireid",
    "IMAGENET_MEAN": "models_vireid",
    "IMAGENET_STD": "models_vireid",
    "IdentityClassifier": "models_vireid",
    "MODALITIES": "models_vireid",
    "ReIDOutput": "models_vireid",
    "TwoStreamReID": "models_vireid",
    "load_imagenet_backbone": "models_vireid",
    "PADSample": "datasets_pad",
    "PADSplits": "datasets_pad",
    "load_oulu_npu": "datasets_pad",
    "load_casia_fasd": "datasets_pad",
    "load_replay_attack": "datasets_pad",
    "load_msu_mfsd": "datasets_pad",
    "load_celeba_spoof": "datasets_pad",
    "CLIPVisionConfig": "models_pad",
    "CLIPVisionTransformer": "models_pad",
    "PromptedPAD": "models_pad",
    "SelectiveEWC": "models_pad",
    "load_clip_visual": "models_pad",
    "PADProxy": "proxy_pad",
    "build_pad_proxy": "proxy_pad",
    "compare_with_real_samples": "proxy_pad",
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
