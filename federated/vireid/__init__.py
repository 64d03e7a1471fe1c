"""Federated visible-infrared person re-identification (task ``vireid``, after L2RW).

Nothing is imported with the package (the modules below load torch or flwr
as they need them); the common names are also exported, lazily, by
:mod:`veilface.federated`.

- :mod:`~veilface.federated.vireid.datasets` (stdlib + numpy): SYSU-MM01,
  RegDB and LLCM indexes, query/gallery protocols.
- :mod:`~veilface.federated.vireid.models` (torch): two-stream MobileNetV2
  encoder, GeM, BN-neck, local identity classifier, ImageNet loader.
- :mod:`~veilface.federated.vireid.proxy` (numpy + Pillow): the LFW
  visible/synthetic-thermal proxy and its site partitions.
- :mod:`~veilface.federated.vireid.training` (torch): local training,
  prototypes, evaluation.
- :mod:`~veilface.federated.vireid.strategy` (flwr): FedAvg(M) with
  per-modality stem averaging and identity-prototype averaging.
- :mod:`~veilface.federated.vireid.flower` (flwr + torch): the task module
  the ServerApp / ClientApp dispatch to.
- :mod:`~veilface.federated.vireid.bench`: ``veilface fed bench --task vireid``.
"""

__all__: list[str] = []
