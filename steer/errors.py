"""One error type for bad input, so every layer can name the offending field.

The server maps :class:`InvalidInput` to gRPC ``INVALID_ARGUMENT``; the CLIs print it and exit 2.
``field`` uses the request's own spelling (``weights[creativity]``, ``sampling.top_p``,
``messages[2].role``) so a client can find what to fix.
"""

from __future__ import annotations


class InvalidInput(ValueError):
    """A value a caller supplied is not acceptable. ``str(e)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")
