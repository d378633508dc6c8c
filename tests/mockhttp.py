"""aioresponses, made to work with aiohttp 3.14.

aioresponses 0.7.9 builds responses without the `stream_writer` argument that aiohttp 3.14's
`ClientResponse` requires (aioresponses#289). Import `aioresponses` from here until a fixed
release exists.
"""

from __future__ import annotations

from types import SimpleNamespace

from aiohttp import ClientResponse
from aioresponses import aioresponses as _aioresponses


class _CompatResponse(ClientResponse):
    def __init__(self, *args, stream_writer=None, **kwargs) -> None:
        super().__init__(*args, stream_writer=stream_writer or SimpleNamespace(output_size=0), **kwargs)


class aioresponses(_aioresponses):  # noqa: N801 - a drop-in for the library class
    def add(self, *args, **kwargs) -> None:
        kwargs["response_class"] = kwargs.get("response_class") or _CompatResponse
        super().add(*args, **kwargs)
