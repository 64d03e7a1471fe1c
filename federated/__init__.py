"""Federated training across camera sites (Flower). Independent of the service."""

__all__: list[str] = []
