"""``powerserve`` command line. ``powerserve serve --help`` lists every option; each option
``--some-name`` is also read from the environment variable ``POWERSERVE_SOME_NAME``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from typing import Any, Literal

from powerserve.settings import Settings


def _settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per Settings field, typed from its annotation (the settings object is the
    single source of truth; the CLI only overrides what the user passes)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "POWERSERVE_" + name.upper()
        help_text = f"{field.description or ''} [env {env}]".strip()
        annotation = field.annotation
        args = typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in args if a is not type(None))
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, action="append", default=None, help=help_text + " (repeatable)")
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), default=None, help=help_text)
        else:
            kind: Any = annotation if annotation in (int, float) else str
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}


def serve(ns: argparse.Namespace) -> int:
    from powerserve.app import create_app
    from powerserve.server import run

    settings = Settings(**_overrides(ns))
    from powerserve.engine.factory import pick_engine

    if pick_engine(settings) == "torch":
        # OpenMP's busy-waiting threads make each hand-off to the torch engine's worker thread
        # cost 15-25 ms on a loaded 2-core CPU; passive waiting brings it to ~1.6 ms. It must be
        # set before torch is imported (vLLM manages its own engine process's threads).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    return run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        drain_timeout_s=settings.drain_timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="powerserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    _settings_options(p_serve)
    p_serve.set_defaults(func=serve)
    from powerserve.distill.cli import add_parser as add_distill

    add_distill(sub)
    from powerserve_client.eval.cli import add_parser as add_eval

    add_eval(sub)
    ns = parser.parse_args(argv)
    result: int = ns.func(ns)
    return result


if __name__ == "__main__":
    sys.exit(main())
