"""Gallery stores: the interface and the embedded SQLite implementation."""

from veilface.server.store.base import GalleryStore
from veilface.server.store.sqlite_store import BinReader, SQLiteStore

__all__ = ["BinReader", "GalleryStore", "SQLiteStore"]
