"""Gallery stores: the interface, the embedded SQLite store and the PostgreSQL store.

``open_store(url)`` / ``open_reader(url)`` pick one from a ``--db`` value
(:mod:`veilface.server.store.factory`); ``PostgresStore`` is imported
lazily so that psycopg is needed only by who uses it.
"""

from veilface.server.store.base import BinReader, GalleryStore
from veilface.server.store.sqlite_store import SQLiteBinReader, SQLiteStore

__all__ = ["BinReader", "GalleryStore", "SQLiteBinReader", "SQLiteStore"]
