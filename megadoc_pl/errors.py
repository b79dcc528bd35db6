"""The package's two error types for users; only command-line front doors turn them into an exit code and one line.

- :class:`BadInput`: input a user can fix (a recipe key, a file, a line, an argument). A
  ``ValueError``, so the front doors' ``except ValueError`` (and code that already raises plain
  ``ValueError("... (fix: ...)")``) need nothing else. The message names what is wrong and ends
  with ``(fix: ...)``; it never starts with ``error:`` (the front door adds that).
- :class:`MissingDependency`: an optional package is not installed. An ``ImportError`` (code that
  probes for a package catches it as usual) and a ``BadInput`` (the front doors print its install
  hint in one line).

Library code never raises ``SystemExit``; ``tests/test_architecture.py`` checks it.
"""

from __future__ import annotations


class BadInput(ValueError):
    """Bad input with the fix in its message: ``"<what is wrong> (fix: <what to change>)"``."""


class MissingDependency(ImportError, BadInput):
    """An optional dependency is missing; the message carries the ``pip install`` hint."""
