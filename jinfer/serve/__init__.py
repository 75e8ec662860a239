"""`jinfer serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn, the `serve` extra).

`jinfer.serve.app.create_app(ServeConfig(...))` builds the ASGI app; `jinfer serve` runs it. Nothing
here imports Starlette until a server is built, so the CLI works without the extra installed.
"""
