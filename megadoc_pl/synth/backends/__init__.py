"""Generation backends behind one interface (see base.py and docs/ARCHITECTURE.md)."""

from megadoc_pl.synth.backends.base import (
    Backend,
    Request,
    Response,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "Request", "Response", "available_backends", "get_backend", "register_backend"]
