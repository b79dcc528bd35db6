"""megadoc_pl.synth: synthetic data generation (backends, tasks, prompts, runner).

The backend contract is re-exported here so other parts can write
``from megadoc_pl.synth import Request, Response, register_backend``.
"""

from megadoc_pl.synth.backends import (
    Backend,
    Request,
    Response,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "Request", "Response", "available_backends", "get_backend", "register_backend"]
