"""Train the kiosk liveness model with the incremental-PAD Flower app and export it.

``veilface fed train --task pad --export liveness.vfpad`` calls
:func:`train_and_export`:

1. render the kiosk proxy of the training sites
   (:func:`~veilface.federated.pad.kiosk_proxy.build_kiosk_proxy`: four
   camera domains, live LFW photos, rendered print and replay attacks, cut
   as the client cuts them), cached in the work folder;
2. run the ``pad`` Flower task (Simulation Engine): domains one after
   another, universal plus per-domain prompts, Selective EWC, no past data
   kept (:mod:`~veilface.federated.pad.flower`), with the ``kiosk-cnn``
   model (:class:`~veilface.nn.pad_cnn.AdaptedCNNPAD`: a truncated ImageNet
   MobileNetV2 with universal and per-domain adapters);
3. choose the decision threshold on the training sites' **validation**
   identities (held out from training, all domains): the P(live) below
   which ``target_bpcer`` of their live faces fall; record the APCER there;
4. write the ``.vfpad`` artifact (:mod:`veilface.nn.liveness_io`) with the
   weights inference needs, the architecture, the crop, the threshold and
   its rule, and where it was trained.

In the proxy every site's data is on this machine, so step 3 scores the
validation images here; in a real federation each site would send a
histogram of its validation scores instead, which is all the choice needs.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

__all__ = ["ExportReport", "KioskTrainConfig", "choose_threshold", "train_and_export"]


@dataclass(frozen=True)
class KioskTrainConfig:
    """Settings of ``veilface fed train --task pad`` (defaults: the shipped model's)."""

    lfw_dir: str
    work_dir: str
    per_domain: int = 1100
    renders: int = 1
    rounds_per_domain: int = 8
    local_epochs: int = 2
    num_sites: int = 2
    lr: float = 1e-3
    ewc_lambda: float = 1.0e5
    ewc_top_p: float = 0.5
    shared_lr_scale: float = 0.5
    target_bpcer: float = 0.05
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.target_bpcer < 0.5:
            raise InvalidArgument(f"target BPCER must be in (0, 0.5), got {self.target_bpcer}")
        if self.num_sites < 1 or self.rounds_per_domain < 1 or self.local_epochs < 1:
            raise InvalidArgument("sites, rounds and local epochs must be >= 1")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`train_and_export` wrote and measured."""

    path: str
    fingerprint: str
    threshold: float
    validation_bpcer: float
    validation_apcer: float
    validation_images: int
    parameters: int
    avg_hter: float
    seconds: float


def choose_threshold(
    live_scores: np.ndarray, attack_scores: np.ndarray, target_bpcer: float
) -> tuple[float, float, float]:
    """The threshold at which ``target_bpcer`` of live scores fall below it.

    Returns ``(threshold, bpcer, apcer)`` measured at that threshold (a face
    is accepted as live when its score is >= the threshold).
    """
    live = np.sort(np.asarray(live_scores, dtype=np.float64))
    if live.size == 0 or np.asarray(attack_scores).size == 0:
        raise InvalidArgument("choosing a threshold needs live and attack validation scores")
    k = int(np.floor(target_bpcer * live.size))
    thr = float(live[k]) if k < live.size else float(live[-1])
    thr = float(np.clip(thr, 1e-6, 1.0 - 1e-6))
    bpcer = float(np.mean(live < thr))
    apcer = float(np.mean(np.asarray(attack_scores) >= thr))
    return thr, bpcer, apcer


def _proxy_file(cfg: KioskTrainConfig, progress: bool) -> Path:
    from veilface.federated.pad.kiosk_proxy import build_kiosk_proxy

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tag = "" if cfg.renders == 1 else f"_r{cfg.renders}"
    path = work / f"kiosk_proxy_n{cfg.per_domain}{tag}_seed{cfg.seed}.npz"
    if not path.is_file():
        logger.info("rendering the kiosk PAD proxy into %s", path)
        build_kiosk_proxy(
            cfg.lfw_dir, per_domain=cfg.per_domain, seed=cfg.seed, progress=progress, renders=cfg.renders
        ).save(path)
    return path


def train_and_export(
    cfg: KioskTrainConfig, export_path: str | Path, *, progress: bool = True
) -> ExportReport:
    """Train with Flower (see the module docstring) and write ``export_path``."""
    import torch

    from veilface.federated.pad.bench import PADBenchConfig, run_method
    from veilface.federated.pad.kiosk_proxy import KIOSK_CROP, KIOSK_DOMAINS
    from veilface.federated.pad.models import numpy_to_state
    from veilface.federated.pad.proxy import load_pad_proxy
    from veilface.federated.pad.training import build_model, images_to_tensor
    from veilface.federated.run_artifacts import load_checkpoint
    from veilface.nn.liveness_io import write_artifact
    from veilface.nn.pad_export import architecture_of, export_arrays, inference_parameters

    t0 = time.perf_counter()
    data = _proxy_file(cfg, progress)
    bench_cfg = PADBenchConfig(
        lfw_dir=cfg.lfw_dir,
        samples_dir="",
        work_dir=str(Path(cfg.work_dir) / "run"),
        per_domain=cfg.per_domain,
        image_size=KIOSK_CROP.size,
        model="kiosk-cnn",
        rounds_per_domain=cfg.rounds_per_domain,
        local_epochs=cfg.local_epochs,
        pretrain_epochs=0,
        lr=cfg.lr,
        ewc_lambda=cfg.ewc_lambda,
        ewc_top_p=cfg.ewc_top_p,
        shared_lr_scale=cfg.shared_lr_scale,
        num_clients=cfg.num_sites,
        seed=cfg.seed,
        threads=cfg.threads,
        augment=True,
    )
    run = run_method(bench_cfg, data, None, "svlp", progress)
    model = build_model("kiosk-cnn", "svlp")
    arrays = load_checkpoint(
        Path(run["out_dir"]) / "checkpoints" / "latest.npz", model_id=model.model_id
    )
    numpy_to_state(model, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    model.eval()
    proxy = load_pad_proxy(data)
    val = proxy.split == 1
    torch.set_num_threads(max(1, cfg.threads))
    with torch.no_grad():
        scores = model.score(images_to_tensor(proxy.images[val])).numpy()
    live = proxy.species[val] == 0
    thr, bpcer, apcer = choose_threshold(scores[live], scores[~live], cfg.target_bpcer)
    run_id = uuid.uuid4().hex[:12]
    training: dict[str, Any] = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": "Flower Simulation Engine",
        "method": "universal + per-domain prompts, Selective EWC, domains in sequence, "
        "no past data kept",
        "rounds_per_domain": cfg.rounds_per_domain,
        "rounds": cfg.rounds_per_domain * len(KIOSK_DOMAINS),
        "local_epochs": cfg.local_epochs,
        "sites": cfg.num_sites,
        "domains": [d.name for d in KIOSK_DOMAINS],
        "proxy": True,
        "data": "PROXY: live LFW photos and rendered print/replay attacks of other LFW people "
        f"(veilface.federated.pad.kiosk_proxy, {cfg.per_domain} photos per domain"
        + (f", each rendered {cfg.renders} times" if cfg.renders > 1 else "")
        + f", seed {cfg.seed}); not a real PAD data set",
        "avg_hter_validation_at_0.5": float(run["avg_hter"]),
        "config": asdict(cfg),
    }
    rule = {
        "target_bpcer": cfg.target_bpcer,
        "bpcer": bpcer,
        "apcer": apcer,
        "on": "validation identities of the training sites (held out from training), "
        "all domains",
        "images": int(val.sum()),
    }
    fingerprint = write_artifact(
        export_path,
        export_arrays(model),
        architecture=architecture_of(model),
        crop=KIOSK_CROP,
        threshold=thr,
        threshold_rule=rule,
        training=training,
    )
    report = ExportReport(
        path=str(export_path),
        fingerprint=fingerprint,
        threshold=thr,
        validation_bpcer=bpcer,
        validation_apcer=apcer,
        validation_images=int(val.sum()),
        parameters=inference_parameters(model),
        avg_hter=float(run["avg_hter"]),
        seconds=time.perf_counter() - t0,
    )
    logger.info("exported %s (%s)", export_path, fingerprint[:12])
    return report
