"""`jinfer serve`: flags, logging, and the uvicorn server with a graceful SIGTERM / Ctrl-C exit."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from jinfer.errors import ConfigError
from jinfer.serve.backend import ServeConfig


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags of `jinfer serve` other than the model flags shared with `generate`."""
    from jinfer.cli import duration, int_at_least

    d = ServeConfig()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free port)")
    p.add_argument(
        "--served-model-name", default=None, help="name clients send as `model` (default: --model)"
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--max-batch",
        type=int_at_least(1),
        default=d.max_batch,
        help="decode slots (requests generating at once; default: what the KV-cache budget holds)",
    )
    p.add_argument(
        "--max-len",
        type=int_at_least(2),
        default=d.max_len,
        help="prompt + generated tokens per request (default: "
        "the model's context, capped (2,048 on CPU) and shortened to fit the KV-cache budget)",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help="prefill buckets, e.g. 16,64,256 "
        "(default: 16, 32, ... 512 on CPU; 128, 256, 512, 1024 on TPU/GPU)",
    )
    p.add_argument(
        "--max-queue", type=int_at_least(0), default=d.max_queue, help="waiting requests before 503 responses"
    )
    p.add_argument(
        "--max-body-bytes", type=int_at_least(1), default=d.max_body_bytes, help="larger bodies get 413"
    )
    p.add_argument(
        "--grace-period",
        type=duration,
        default=d.grace_period,
        help="seconds in-flight requests get to finish on SIGTERM / Ctrl-C",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; accepted: an integer 0-65535")
    return value


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of the flags; every value is checked here, before the model loads."""
    buckets = None
    if args.buckets:
        try:
            buckets = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            buckets = ()
        if not buckets or min(buckets) < 1:
            raise ConfigError(f"--buckets {args.buckets!r}: expected comma-separated integers >= 1")
    if args.mesh:  # a bad spec, or one this host's devices cannot make, exits 2 before the server starts
        from jinfer.sharding import make_mesh

        make_mesh(args.mesh)
    return ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        mesh=args.mesh,
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch=args.max_batch,
        max_len=args.max_len,
        buckets=buckets,
        max_queue=args.max_queue,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        grace_period=args.grace_period,
    )


def serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM / Ctrl-C; 0 after a graceful stop, 1 if the model fails to load."""
    try:
        import uvicorn

        from jinfer.serve.app import create_app
        from jinfer.serve.graceful import GracefulServer
    except ImportError as e:
        raise ConfigError(f"jinfer serve needs the serve extra: pip install 'jinfer[serve]' ({e})") from e
    config = config_from_args(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    failed = []

    def load_failed() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(config, on_load_error=load_failed)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level=args.log_level,
        access_log=False,  # jinfer logs one line per request itself
        # a backstop only: requests still running at the end of the grace period are aborted first
        timeout_graceful_shutdown=config.grace_period + 5,  # type: ignore[arg-type]  (asyncio.timeout takes floats)
        lifespan="on",
    )
    server = GracefulServer(uv_config, config.grace_period, app.state.openai_server.abort_in_flight)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler in place lets a
    # graceful stop end with exit status 0 instead of the signal's default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    code = 1 if failed else 0
    if app.state.openai_server.loading:
        # Stopped before the model was loaded: the restore cannot be cancelled, and ending the
        # interpreter under its threads may abort it; nothing is left to save.
        logging.getLogger("jinfer.serve").warning("stopped while the model was loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
