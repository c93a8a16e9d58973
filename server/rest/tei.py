"""(to be written)"""

from __future__ import annotations

from starlette.routing import Route

from .common import HttpContext

__all__ = ["routes"]


def routes(context: HttpContext) -> list[Route]:
    return []
