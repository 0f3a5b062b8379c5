"""The ``webhook-router`` command line.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure. Errors are one clear line
(or one per problem), never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from router import __version__, logs
from router.config import CONFIG_ENV, DEFAULT_CONFIG, Config, config_path, load_config
from router.errors import ConfigError, JournalUnavailable, ListenError
from router.routing import describe

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhook-router",
        description="Receive Metriport webhooks, journal them durably, route them to sinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})"

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", "-c", help=config_help)
        return sub

    serve = with_config("serve", "run the daemon in the foreground")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="overrides log.level of the configuration",
    )
    with_config("check", "validate the configuration, print the routes")
    listing = with_config(
        "plugins", "the plugins loaded: from where, which sink types and hooks each provides"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    status = with_config("status", "deliveries per sink: pending, retrying, dead, oldest, error")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    dead = commands.add_parser("dead", help="list, retry or purge dead letters")
    dead_verbs = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    for verb, text in (
        ("list", "list dead letters (never their bodies)"),
        ("retry", "make dead letters pending again, with a fresh retry budget"),
        ("purge", "delete dead letters"),
    ):
        sub = dead_verbs.add_parser(verb, help=text, description=text)
        sub.add_argument("--config", "-c", help=config_help)
        _add_filters(sub)
        if verb == "list":
            sub.add_argument("--limit", type=_positive, help="show at most N")
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sub.add_argument("--all", action="store_true", help="required when no filter given")
            sub.add_argument("--dry-run", action="store_true", help="say what, change nothing")

    replay = with_config("replay", "deliver stored messages again (e.g. to a new sink)")
    replay.add_argument("--since", required=True, help="ISO time (UTC) or a duration ago: 6h")
    replay.add_argument("--until", help="ISO time (UTC) or a duration ago (default: now)")
    _add_filters(replay, ids=False)
    replay.add_argument("--dry-run", action="store_true", help="count, change nothing")

    metriport = commands.add_parser(
        "metriport", help="Metriport's failed deliveries: show them, ask it to resend them"
    )
    metriport_verbs = metriport.add_subparsers(
        dest="metriport_command", required=True, metavar="ACTION"
    )
    for verb, text in (
        ("status", "what Metriport reports (processing, failed) and when the router last asked"),
        ("retry", "ask Metriport to resend every failed delivery (once: it has no lock)"),
    ):
        sub = metriport_verbs.add_parser(verb, help=text, description=text)
        sub.add_argument("--config", "-c", help=config_help)
        if verb == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sub.add_argument(
                "--force",
                action="store_true",
                help="call even while Metriport still resends or a router is asking",
            )

    explain = with_config("explain", "which routes and sinks a message would reach")
    explain.add_argument("file", type=Path, help="a message body (JSON)")

    send = commands.add_parser(
        "send", help="post a signed test message, as Metriport would, and print the answer"
    )
    send.add_argument("--url", required=True, help="the router's webhook URL")
    key = send.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", help="the webhook key to sign with")
    key.add_argument("--key-env", metavar="NAME", help="read the key from this variable")
    what = send.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", type=Path, help="a JSON body to send as it is")
    what.add_argument("--type", help="generate an example message of this meta.type")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _add_filters(sub: argparse.ArgumentParser, ids: bool = True) -> None:
    sub.add_argument("--sink", action="append", default=[], help="only this sink (repeatable)")
    sub.add_argument("--type", action="append", default=[], help="only types matching this glob")
    if ids:
        sub.add_argument("--id", action="append", default=[], help="only this message id")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flush here, not at interpreter exit: a reader that went away (output piped into
        # `head` and the like) must be caught below, not reported as an ignored exception.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout once more at exit: point it at /dev/null so that stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "send":
        from router.send import send

        return send(args.url, args.key, args.key_env, args.file, args.type)
    path = config_path(args.config)
    if args.command == "plugins":
        from router import opscli

        # Without a configuration file (none given, none at the default place): the built-in
        # and installed plugins alone, which every configuration on this host gets.
        given = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG.exists()
        return opscli.plugins(path if given else None, args.json)
    try:
        # The operator commands need the journal and the routes, not the keys (nor the sinks'
        # secrets): they run as users who may not have them, so they read no secret at all,
        # but for `metriport`, which reads the API key (and no other secret).
        secrets: bool | tuple[str, ...] = args.command in ("serve", "check")
        if args.command == "metriport":
            secrets = ("metriport",)
        config = load_config(path, secrets=secrets)
    except ConfigError as e:
        _print_problems(path, e)
        return EXIT_CONFIG
    if args.command == "check":
        _print_check(config)
        return EXIT_OK
    if args.command == "serve":
        return _serve(config, args.log_level)
    from router import opscli
    from router.ops import OpsError

    try:
        return opscli.run(config, args)
    except OpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME


def _print_problems(path: Path, error: ConfigError) -> None:
    count = len(error.problems)
    print(f"{path}: {count} problem{'s' if count != 1 else ''}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    if any(p.message.startswith("cannot read") and not p.path for p in error.problems):
        print(f"hint: pass --config PATH or set {CONFIG_ENV}", file=sys.stderr)


def _print_check(config: Config) -> None:
    for warning in config.warnings:
        print(f"warning: {warning}")
    print(f"{config.file}: OK")
    server = config.server
    print(f"listen:  {', '.join(server.listen)}  POST {server.path}")
    print(f"auth:    {' + '.join(config.auth.accept)}, {len(config.auth.keys)} key(s)")
    print(f"journal: {_journal_text(config)}")
    if config.metriport is not None:
        print(f"metriport: {_metriport_text(config)}")
    print("routes (every matching route fires; a sink gets a message once):")
    rows = describe(config.routes)
    width = max(len(pattern) for pattern, _ in rows)
    for pattern, sinks in rows:
        print(f"  {pattern.ljust(width)}  ->  {sinks}")
    types = sorted({sink.type for sink in config.sinks.values()})
    print("sink types (provided by):")
    width = max(len(name) for name in types)
    for name in types:
        print(f"  {name.ljust(width)}  {config.plugin_manager.provider(name)}")
    print("sinks:")
    width = max(len(name) for name in config.sinks)
    for name, sink in config.sinks.items():
        order = ", ordered" if sink.ordered else ""
        print(
            f"  {name.ljust(width)}  {sink.build(config.base_dir).describe()}"
            f"  (retry up to {sink.retry.max_attempts or 'unlimited'} attempts,"
            f" timeout {sink.timeout:g}s{order})"
        )


def _metriport_text(config: Config) -> str:
    section = config.metriport
    assert section is not None
    retry = section.retry_failed
    if retry is None:
        return f"{section.base_url}, retry_failed off"
    every = f"every {retry.every:g}s" if retry.every is not None else "no periodic check"
    return (
        f"{section.base_url}, asks to resend failed deliveries on {' and '.join(retry.when)}"
        f" and {every} (follows processing every {retry.poll:g}s)"
    )


def _journal_text(config: Config) -> str:
    pg = config.journal.postgres
    if pg is None:
        return str(config.journal.path)
    from router.journal import journal_for

    listen = "LISTEN/NOTIFY" if pg.listen else "polling (listen: false)"
    return (
        f"{journal_for(config.journal).describe()} (PostgreSQL, pool {pg.pool}, {listen};"
        f" large bodies received in {config.journal.path})"
    )


def _serve(config: Config, log_level: str | None) -> int:
    import anyio

    from router import app

    logs.setup(log_level or config.log.level, config.log.format)
    log = logging.getLogger("router")
    for warning in config.warnings:
        log.warning(warning)
    from router import supervisor

    try:
        worker = supervisor.worker_from_env()
        if worker is None and config.server.workers > 1:
            return supervisor.run(config, log_level)
        anyio.run(
            functools.partial(app.serve, config, worker=worker),
            backend="asyncio",
            backend_options=_loop_options(),
        )
    except (JournalUnavailable, ListenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    except Exception as e:
        # Last resort: one line for the operator, never a traceback (which could quote data).
        print(f"error: webhook-router stopped unexpectedly: {type(e).__name__}", file=sys.stderr)
        log.critical("unexpected failure", exc_info=log.isEnabledFor(logging.DEBUG))
        return EXIT_RUNTIME
    return EXIT_OK


def _loop_options() -> dict[str, bool]:
    """uvloop when it is installed: the HTTP layer is the daemon's ceiling, and uvloop's
    transports are faster than asyncio's."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


if __name__ == "__main__":
    sys.exit(main())
