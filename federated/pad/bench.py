"""The incremental-PAD PROXY benchmark: SVLP-style method vs naive fine-tuning on Flower.

``veilface fed bench --task pad`` calls :func:`run_pad_bench`:

1. render the proxy (:func:`~veilface.federated.pad.proxy.build_pad_proxy`:
   LFW live faces, rendered print/replay attacks, four capture domains) and
   put simple statistics of it beside the real ``pad-samples`` photos;
2. pretrain the CLIP-style tower on a generic degradation-regression task
   (:mod:`~veilface.federated.pad.pretrain`, a stand-in for CLIP weights,
   which cannot be installed here) and hand it to both methods through
   ``pad-clip-weights``;
3. run the ``pad`` Flower task on the Simulation Engine twice with the same
   budget (domains x rounds x local epochs, same sites, same seed):
   ``pad-method="svlp"`` (prompts + Selective EWC) and ``"naive"``
   (sequential fine-tuning);
4. score the real ``pad-samples`` photos with the final svlp model (four
   photos: an anecdote, not a measurement).

All figures are **proxy** figures: they say how the method behaves on
rendered attacks, not on OULU-NPU, CASIA-FASD, Replay-Attack or MSU-MFSD.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from veilface.errors import InvalidArgument
from veilface.federated.pad.proxy import (
    CAPTURE_DOMAINS,
    build_pad_proxy,
    compare_with_real_samples,
    load_pad_proxy,
)

logger = logging.getLogger(__name__)

__all__ = ["PADBenchConfig", "run_method", "run_pad_bench", "score_real_samples"]


@dataclass(frozen=True)
class PADBenchConfig:
    """Settings of the proxy benchmark (defaults: ~8 min on 2 shared cores)."""

    lfw_dir: str
    samples_dir: str
    work_dir: str
    per_domain: int = 800
    image_size: int = 48
    model: str = "small"
    rounds_per_domain: int = 4
    local_epochs: int = 2
    pretrain_epochs: int = 6
    pretrain_images: int = 1000
    lr: float = 5e-4
    ewc_lambda: float = 1.0e5
    ewc_top_p: float = 0.5
    shared_lr_scale: float = 0.3
    num_clients: int = 2
    seed: int = 0
    threads: int = 2
    augment: bool = False


def _proxy_path(cfg: PADBenchConfig) -> Path:
    work = Path(cfg.work_dir) / "pad"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"proxy_n{cfg.per_domain}_s{cfg.image_size}_seed{cfg.seed}.npz"
    if not path.is_file():
        logger.info("rendering the PAD proxy into %s", path)
        build_pad_proxy(
            cfg.lfw_dir, per_domain=cfg.per_domain, image_size=cfg.image_size, seed=cfg.seed
        ).save(path)
    return path


def _pretrained_path(cfg: PADBenchConfig, skip_people: int, progress: bool) -> Path:
    from veilface.federated.pad.pretrain import pretrain_visual
    from veilface.federated.pad.training import MODEL_CONFIGS

    path = (
        Path(cfg.work_dir)
        / "pad"
        / f"pretrained_{cfg.model}_e{cfg.pretrain_epochs}_n{cfg.pretrain_images}"
        f"_skip{skip_people}_seed{cfg.seed}.pt"
    )
    if not path.is_file():
        pretrain_visual(
            MODEL_CONFIGS[cfg.model],
            cfg.lfw_dir,
            path,
            skip_people=skip_people,
            num_images=cfg.pretrain_images,
            epochs=cfg.pretrain_epochs,
            seed=cfg.seed,
            progress=progress,
        )
    return path


def run_method(
    cfg: PADBenchConfig, data: Path, weights: Path | None, method: str, progress: bool
) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from veilface.federated.client_app import make_client_app
    from veilface.federated.server_app import make_server_app

    out = Path(cfg.work_dir) / "pad" / method
    shutil.rmtree(out, ignore_errors=True)  # RunArtifacts appends to an existing run
    overrides: dict[str, Any] = {
        "task": "pad",
        "out-dir": str(out),
        "num-server-rounds": cfg.rounds_per_domain,
        "pad-data": str(data),
        "pad-method": method,
        "pad-model": cfg.model,
        "pad-local-epochs": cfg.local_epochs,
        "pad-lr": cfg.lr,
        "pad-ewc-lambda": cfg.ewc_lambda,
        "pad-ewc-top-p": cfg.ewc_top_p,
        "pad-shared-lr-scale": cfg.shared_lr_scale,
        "pad-augment": cfg.augment,
        "pad-min-nodes": cfg.num_clients,
        "pad-seed": cfg.seed,
        "pad-progress": progress,
        "pad-clip-weights": str(weights) if weights is not None else "",
    }
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # threads = CPUs given to Ray: how many sites train at once (one torch thread each)
            "init_args": {"num_cpus": cfg.threads},
        },
    )
    results_file = out / "pad_results.json"
    if not results_file.is_file():
        raise InvalidArgument(f"the {method} run wrote no {results_file}; see the Flower log")
    result: dict[str, Any] = json.loads(results_file.read_text())
    result["out_dir"] = str(out)
    return result


def score_real_samples(
    checkpoint: str | Path, method: str, model_size: str, samples_dir: str | Path
) -> dict[str, float]:
    """P(live) of each ``pad-samples`` photo under a saved model (central square, resized).

    Returns
    -------
    dict[str, float]
        File name -> P(live) in ``[0, 1]``.
    """
    import torch

    from veilface.federated.pad.models import numpy_to_state
    from veilface.federated.pad.training import build_model, images_to_tensor
    from veilface.federated.run_artifacts import load_checkpoint

    model = build_model(model_size, method)
    arrays = load_checkpoint(checkpoint, model_id=model.model_id)
    numpy_to_state(model, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    side = model.config.image_size
    scores: dict[str, float] = {}
    for f in sorted(Path(samples_dir).glob("image_*.jpg")):
        with Image.open(f) as raw:
            im = raw.convert("RGB")
            w, h = im.size
            s = min(w, h)
            crop = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
            arr = np.asarray(crop.resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)
        with torch.no_grad():
            scores[f.name] = float(model.score(images_to_tensor(arr[None]))[0])
    return scores


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 else a / b


def run_pad_bench(cfg: PADBenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the proxy benchmark end to end and return the JSON-ready results.

    Keys: ``avg_hter``, ``naive_avg_hter``, ``forgetting``,
    ``naive_forgetting`` (HTER units, positive = forgotten), their ratios,
    ``avg_acer`` / ``avg_auc`` (and naive), per-domain matrices
    ``hter_matrix`` / ``acer_matrix`` / ``auc_matrix`` (row = after domain
    i, column = domain j) for both methods, ``targets``, ``proxy_check``
    (rendered vs real statistics), ``real_sample_scores``, ``seconds``.
    """
    if cfg.threads < 1:
        raise InvalidArgument(f"threads must be >= 1, got {cfg.threads}")
    t0 = time.perf_counter()
    data = _proxy_path(cfg)
    proxy = load_pad_proxy(data)
    t_proxy = time.perf_counter() - t0
    check = compare_with_real_samples(proxy, cfg.samples_dir)
    seconds: dict[str, float] = {"proxy": t_proxy}
    weights = None
    if cfg.pretrain_epochs > 0:
        t = time.perf_counter()
        weights = _pretrained_path(cfg, int(proxy.identity.max()) + 1, progress)
        seconds["pretrain"] = time.perf_counter() - t
    runs: dict[str, dict[str, Any]] = {}
    for method in tqdm(("svlp", "naive"), desc="pad bench", unit="method", disable=not progress):
        t = time.perf_counter()
        runs[method] = run_method(cfg, data, weights, method, progress)
        seconds[method] = time.perf_counter() - t
    ours, naive = runs["svlp"], runs["naive"]
    ckpt = Path(ours["out_dir"]) / "checkpoints" / "latest.npz"
    real_scores = score_real_samples(ckpt, "svlp", cfg.model, cfg.samples_dir)
    hter_ratio = _ratio(ours["avg_hter"], naive["avg_hter"])
    forget_ratio = _ratio(ours["forgetting"], naive["forgetting"])
    seconds["total"] = time.perf_counter() - t0
    return {
        "benchmark": "incremental PAD PROXY (LFW live, rendered print/replay, 4 capture domains)",
        "config": asdict(cfg),
        "domains": [d.name for d in CAPTURE_DOMAINS][: ours["num_domains"]],
        "avg_hter": ours["avg_hter"],
        "naive_avg_hter": naive["avg_hter"],
        "forgetting": ours["forgetting"],
        "naive_forgetting": naive["forgetting"],
        "avg_hter_ratio": hter_ratio,
        "forgetting_ratio": forget_ratio,
        "avg_acer": ours["avg_acer"],
        "naive_avg_acer": naive["avg_acer"],
        "avg_auc": ours["avg_auc"],
        "naive_avg_auc": naive["avg_auc"],
        "hter_matrix": ours["hter_matrix"],
        "acer_matrix": ours["acer_matrix"],
        "auc_matrix": ours["auc_matrix"],
        "domain_selection_matrix": ours["domacc_matrix"],
        "naive_hter_matrix": naive["hter_matrix"],
        "naive_acer_matrix": naive["acer_matrix"],
        "naive_auc_matrix": naive["auc_matrix"],
        "targets": {
            "avg_hter <= 0.7 x naive": hter_ratio is not None and hter_ratio <= 0.7,
            "forgetting <= 0.5 x naive": forget_ratio is not None and forget_ratio <= 0.5,
        },
        "proxy_check": check,
        "real_sample_scores": real_scores,
        "threshold": 0.5,
        "plots": {m: str(Path(r["out_dir"]) / "metrics.png") for m, r in runs.items()},
        "seconds": seconds,
    }


def print_pad_table(result: dict[str, Any]) -> None:
    """Print the benchmark table (used by ``veilface fed bench --task pad``)."""
    print(result["benchmark"])
    print(f"{'method':<22} {'avg HTER':>9} {'avg ACER':>9} {'avg AUC':>8} {'forgetting':>11}")
    print(
        f"{'svlp (prompts+S-EWC)':<22} {100 * result['avg_hter']:9.1f} "
        f"{100 * result['avg_acer']:9.1f} {100 * result['avg_auc']:8.1f} "
        f"{100 * result['forgetting']:11.1f}"
    )
    print(
        f"{'naive fine-tuning':<22} {100 * result['naive_avg_hter']:9.1f} "
        f"{100 * result['naive_avg_acer']:9.1f} {100 * result['naive_avg_auc']:8.1f} "
        f"{100 * result['naive_forgetting']:11.1f}"
    )
    for key in ("avg_hter_ratio", "forgetting_ratio"):
        value = result[key]
        print(f"{key}: {'n/a' if value is None else f'{value:.2f}'}")
    for target, ok in result["targets"].items():
        print(f"target {target}: {'met' if ok else 'NOT met'}")
    print(
        "HTER (%) per domain after the last domain: svlp "
        + " ".join(f"{100 * v:.1f}" for v in result["hter_matrix"][-1])
        + " | naive "
        + " ".join(f"{100 * v:.1f}" for v in result["naive_hter_matrix"][-1])
    )
    print(
        "real pad-samples P(live): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["real_sample_scores"].items())
    )
    print(f"total {result['seconds']['total']:.0f} s")
