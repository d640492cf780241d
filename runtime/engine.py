"""Opening a folder the runtime can run: ``open_engine``, ``Engine`` and ``EngineError`` live in
``pladis.manifest`` (build opens export folders with them too); the runtime's names for them."""

from pladis.manifest import Engine, EngineError, open_engine

__all__ = ["Engine", "EngineError", "open_engine"]
