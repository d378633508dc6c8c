"""What an operator sees and does, one file per surface; imports point one way (down this list).

- `web`: the HTTP server (/healthz, /readyz, /metrics, /status, /api/status) - uses `page` and `summary`.
- `page`: the /status page as HTML.
- `terminal`: the tables of `mirrord status`, `show` and `check` - uses `actions` (types only).
- `actions`: what `show`, `retry` and `check` do, as dataclasses.
- `summary`: what the store says about the pipeline, as data; read by all of the above.
"""
