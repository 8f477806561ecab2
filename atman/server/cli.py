"""``atman serve``: the HTTP API and web page for one or more models."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import AtmanError

DEFAULTS = dict(max_body_bytes=1_000_000, max_prompt_tokens=2048, max_units=256, max_tokens=256,
                max_completions=8, timeout_s=300.0, max_queue=64)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve explanations and steering over HTTP (Aleph Alpha's API)")
    serve.add_argument("--model", "-m", action="append", dest="models", metavar="NAME",
                       help="a model to serve (repeatable): 'smollm2' (default), 'gemma3-270m', a .gguf file, "
                            "a model directory or a hub id; requests name it by this or by its display name")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    serve.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-env", default="ATMAN_SERVER_TOKEN", metavar="VAR",
                       help="require 'Authorization: Bearer <token>' with the token in this environment "
                            "variable, when it is set (default ATMAN_SERVER_TOKEN)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULTS["max_body_bytes"])
    serve.add_argument("--max-prompt-tokens", type=int, default=DEFAULTS["max_prompt_tokens"])
    serve.add_argument("--max-units", type=int, default=DEFAULTS["max_units"],
                       help="most units (forward passes) one explanation may take")
    serve.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                       help="most tokens one completion may generate")
    serve.add_argument("--max-completions", type=int, default=DEFAULTS["max_completions"], help="largest n")
    serve.add_argument("--timeout", type=float, default=DEFAULTS["timeout_s"],
                       help="seconds a request may take, queueing included")
    serve.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                       help="requests that may wait; more are answered 503")
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from . import Limits, create_app
    except ImportError as exc:
        print(f"atman serve needs the server extra (pip install 'atman[server]'): {exc}", file=sys.stderr)
        return 2
    from ..models import load_model

    numbers = {"--max-body-bytes": args.max_body_bytes, "--max-prompt-tokens": args.max_prompt_tokens,
               "--max-units": args.max_units, "--max-tokens": args.max_tokens,
               "--max-completions": args.max_completions, "--timeout": args.timeout, "--max-queue": args.max_queue}
    for flag, value in numbers.items():
        if value <= 0:
            print(f"atman serve: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    if not 0 < args.port < 65536:
        print(f"atman serve: --port must lie in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    token = os.environ.get(args.token_env) or None
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_units=args.max_units, max_tokens=args.max_tokens, max_completions=args.max_completions,
                    timeout_s=args.timeout, max_queue=args.max_queue)
    models = {}
    try:
        for name in args.models or ["smollm2"]:
            print(f"loading {name} ...", file=sys.stderr)
            models[name] = load_model(name, dtype=args.dtype, device=args.device)
    except AtmanError as exc:
        print(f"atman serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(models, limits=limits, token=token)
    print(f"serving {', '.join(models)} at http://{args.host}:{args.port}/"
          f"{' (bearer token required)' if token else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=max(int(args.timeout), 1),
                log_level="info")
    return 0
