"""Federated rehearsal-free incremental presentation-attack detection (task ``pad``).

Nothing is imported with the package (the modules below load torch or flwr
as they need them); the common names are also exported, lazily, by
:mod:`veilface.federated`.

- :mod:`~veilface.federated.pad.datasets` (stdlib): OULU-NPU, CASIA-FASD,
  Replay-Attack, MSU-MFSD and CelebA-Spoof indexes.
- :mod:`~veilface.federated.pad.models` (torch): CLIP-style ViT with
  universal and per-domain prompts, Selective EWC, CLIP weight loader.
- :mod:`~veilface.federated.pad.proxy` (numpy + Pillow): the LFW-rendered
  print/replay proxy, one capture domain after another.
- :mod:`~veilface.federated.pad.training` (torch): local training, Fisher
  information, evaluation per domain.
- :mod:`~veilface.federated.pad.pretrain` (torch): label-free pre-training
  of the image tower on degradation regression.
- :mod:`~veilface.federated.pad.flower` (flwr + torch): the task module the
  ServerApp / ClientApp dispatch to.
- :mod:`~veilface.federated.pad.bench`: ``veilface fed bench --task pad``.
"""

__all__: list[str] = []
