"""``atman serve``: the HTTP API and web page for one or more models.

Every option is checked before a model loads (a bad one exits 2 at once), the token and the
host names before the server starts; see docs/server.md, "Limits and failure behaviour".
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

from ..server import security
from .shared import DTYPES, MAX_COUNT, UsageError, add_placement_options, load_options, said, text_only_options

DEFAULTS = dict(max_body_bytes=1_000_000, max_prompt_tokens=2048, max_units=256, max_tokens=256,
                max_completions=8, timeout_s=300.0, max_queue=64, max_connections=128,
                keep_alive_s=5.0, read_timeout_s=15.0, check_interval_s=2.0)
# a request's time limit, the keep-alive and the read timeout: at most a day (asyncio's timers
# overflow far beyond it, and no request of this server should take longer)
MAX_SECONDS = 86_400.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``serve`` sub-command."""
    serve = subparsers.add_parser("serve", help="serve explanations and steering over HTTP (Aleph Alpha's API)")
    serve.add_argument("--model", "-m", action="append", dest="models", metavar="NAME",
                       help="a model to serve (repeatable): 'smollm2' (default), 'gemma3-270m', a .gguf file, "
                            "a model directory or a hub id; requests name it by this or by its display name")
    serve.add_argument("--dtype", default="float32", choices=DTYPES)
    serve.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps or auto")
    add_placement_options(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-env", default="ATMAN_SERVER_TOKEN", metavar="VAR",
                       help="require 'Authorization: Bearer <token>' with the token in this environment "
                            "variable, when it is set (default ATMAN_SERVER_TOKEN)")
    serve.add_argument("--allow-host", action="append", dest="allowed_hosts", metavar="NAME",
                       help="without a token: a host name that requests may carry in their Host header "
                            "(repeatable; default: the --host and, on loopback, localhost; '*' allows any)")
    serve.add_argument("--max-body-bytes", type=float, default=DEFAULTS["max_body_bytes"])
    serve.add_argument("--max-prompt-tokens", type=float, default=None,
                       help=f"at most the context of every served model (default {DEFAULTS['max_prompt_tokens']}, "
                            "or the smallest served context when that is smaller)")
    serve.add_argument("--max-units", type=float, default=DEFAULTS["max_units"],
                       help="most units (forward passes) one explanation may take")
    serve.add_argument("--max-tokens", type=float, default=DEFAULTS["max_tokens"],
                       help="most tokens one completion may generate")
    serve.add_argument("--max-completions", type=float, default=DEFAULTS["max_completions"], help="largest n")
    serve.add_argument("--timeout", type=float, default=DEFAULTS["timeout_s"],
                       help="seconds a request may take, queueing included; also the shutdown grace period")
    serve.add_argument("--check-interval", type=float, default=DEFAULTS["check_interval_s"], metavar="SECONDS",
                       help="a running explanation checks its deadline and its client about this often (its "
                            "passes are cut into pieces of this long at the device's nominal speed)")
    serve.add_argument("--max-queue", type=float, default=DEFAULTS["max_queue"],
                       help="requests that may wait; more are answered 503")
    serve.add_argument("--max-connections", type=float, default=DEFAULTS["max_connections"],
                       help="open connections and requests in progress; more are answered 503")
    serve.add_argument("--keep-alive", type=float, default=DEFAULTS["keep_alive_s"], metavar="SECONDS",
                       help="an idle keep-alive connection is closed after this long")
    serve.add_argument("--read-timeout", type=float, default=DEFAULTS["read_timeout_s"], metavar="SECONDS",
                       help="a request's headers and body must arrive within this long, else the connection "
                            "is closed")
    serve.set_defaults(handler=run)


def checked_numbers(args: argparse.Namespace) -> dict[str, int | float]:
    """The numeric options, each finite, positive and within its range, or a usage error naming it."""
    counts = {"max_body_bytes": "--max-body-bytes", "max_prompt_tokens": "--max-prompt-tokens",
              "max_units": "--max-units", "max_tokens": "--max-tokens", "max_completions": "--max-completions",
              "max_queue": "--max-queue", "max_connections": "--max-connections"}
    seconds = {"timeout": "--timeout", "keep_alive": "--keep-alive", "read_timeout": "--read-timeout",
               "check_interval": "--check-interval"}
    out: dict[str, int | float] = {}
    for name, flag in counts.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_COUNT:
            raise UsageError(f"{flag} must be a whole number in 1..{MAX_COUNT}, got {value:g}")
        out[name] = int(value)
    for name, flag in seconds.items():
        value = getattr(args, name)
        if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
            raise UsageError(f"{flag} must be a number of seconds in (0, {MAX_SECONDS:g}], got {value:g}")
        out[name] = float(value)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must lie in 1..65535, got {args.port}")
    return out


def server_token(variable: str) -> str | None:
    """The bearer token from ``variable``: None when it is unset; refused when no client could send it."""
    token = os.environ.get(variable)
    problem = None if token is None else security.token_problem(token)
    if problem is not None:
        raise UsageError(f"{variable} is set but {problem}, which no client can send in an Authorization header; "
                         f"set a token of letters, digits and punctuation, or unset {variable} to serve without "
                         "authentication")
    return token


def allowed_hosts(host: str, given: list[str] | None) -> list[str] | None:
    """The Host header names accepted when auth is off; None accepts any (``--allow-host '*'``)."""
    if given:
        return None if "*" in given else list(given)
    names = [] if host in WILDCARDS else [host]
    if host in WILDCARDS or security.is_loopback(host):
        names += list(LOOPBACK_NAMES)
    if host in WILDCARDS:
        names += sorted({socket.gethostname(), socket.getfqdn()})
    return list(dict.fromkeys(names))


def default_prompt_tokens(models: Iterable[Any]) -> int:
    """``--max-prompt-tokens`` when not given: the default, or the smallest served context if smaller."""
    contexts = [lm.context_length for lm in models]
    return min([DEFAULTS["max_prompt_tokens"], *(c for c in contexts if c is not None)])


def run(args: argparse.Namespace) -> int:
    """Check the options, load the models, serve until SIGINT/SIGTERM."""
    numbers = checked_numbers(args)
    token = server_token(args.token_env)
    hosts = None if token is not None else allowed_hosts(args.host, args.allowed_hosts)
    try:
        import uvicorn

        from ..server import Limits, create_app
        from ..server.protocol import guarded_protocol
    except ImportError as exc:
        raise UsageError(f"atman serve needs the server extra (pip install 'atman[server]'): {exc}") from None
    from ..models import load_model
    from ..vision import is_vision_language
    from ..vision_language import load_vision_language
    from .shared import quiet_libraries

    quiet_libraries()
    models = {}
    for name in args.models or ["smollm2"]:
        print(f"loading {name} ...", file=sys.stderr)
        if is_vision_language(name):
            ignored = text_only_options(args)
            if ignored:
                raise UsageError(f"{said(ignored)} only to text models; {name} is a vision-language model, "
                                 "served in float32 on --device")
            models[name] = load_vision_language(name, device=args.device or "cpu")
        else:
            models[name] = load_model(name, **load_options(args))
    prompt_tokens = numbers.get("max_prompt_tokens") or default_prompt_tokens(models.values())
    limits = Limits(max_body_bytes=numbers["max_body_bytes"], max_prompt_tokens=prompt_tokens,
                    max_units=numbers["max_units"], max_tokens=numbers["max_tokens"],
                    max_completions=numbers["max_completions"], timeout_s=numbers["timeout"],
                    max_queue=numbers["max_queue"], check_interval_s=numbers["check_interval"])
    app = create_app(models, limits=limits, token=token, allowed_hosts=hosts)
    if token is None and not security.is_loopback(args.host):
        print(f"atman serve: warning: serving on {args.host or 'every interface'} without authentication: anyone "
              f"who can reach this port can use the models (set {args.token_env} to require a token)",
              file=sys.stderr)
    print(f"serving {', '.join(models)} at http://{args.host}:{args.port}/"
          f"{' (bearer token required)' if token else ''}", file=sys.stderr)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info",
        http=guarded_protocol(numbers["read_timeout"]),
        limit_concurrency=numbers["max_connections"],
        timeout_keep_alive=numbers["keep_alive"],
        timeout_graceful_shutdown=max(math.ceil(numbers["timeout"]), 1),
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 0
