"""What an operator sees and does, one file per surface; imports point one way (down this list).

- `web`: the HTTP server (/healthz, /readyz, /metrics, /status, /item/..., /login) - uses the three below.
- `page`: the HTML pages (/status, an item's page, the sign-in form).
- `terminal`: the tables of `mirrord status`, `show` and `check`.
- `actions`: what `show`, `retry` and `check` do, as dataclasses (page and terminal render them).
- `summary`: what the store says about the pipeline, as data; read by web, `mirrord status` and the demo.
"""
