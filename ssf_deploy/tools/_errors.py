"""A failure as the CLI says it: one line, the library's argument names shown as this command's
flags; with ``--debug`` / ``SSF_DEPLOY_DEBUG=1`` the whole cause chain follows, for bug reports.

Library messages write an argument or field in backticks (`` `workspace_gb` must be > 0``); a
name that is one of the running command's option names (``workspace_gb`` -> ``--workspace-gb``)
or spells one of its flags (``inputs`` -> ``--inputs``) is shown as that flag, any other name
stays as it is: it is a Python argument the command sets itself.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Optional

import click

__all__ = ["DEBUG_ENV", "set_debug", "debug_enabled", "cli_message", "report_failure"]

DEBUG_ENV = "SSF_DEPLOY_DEBUG"
_STATE = {"debug": False}
_NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def set_debug(on: bool) -> None:
    _STATE["debug"] = bool(on)


def debug_enabled() -> bool:
    return _STATE["debug"] or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def flag_for(command: Optional[click.Command], name: str) -> Optional[str]:
    """The flag of ``command`` that sets the library argument ``name``, if it has one."""
    for p in getattr(command, "params", ()):
        if not isinstance(p, click.Option):
            continue
        spelled = "--" + name.replace("_", "-")
        if p.name == name or spelled in p.opts:
            long = [o for o in p.opts if o.startswith("--")]
            return spelled if spelled in p.opts else (long or p.opts)[0]
    return None


def cli_message(message: str, command: Optional[click.Command]) -> str:
    """``message`` with every backticked argument the command has shown as its flag."""
    return _NAME.sub(lambda m: flag_for(command, m.group(1)) or m.group(0), message)


def report_failure(exc: BaseException, command: Optional[click.Command],
                   text: Optional[str] = None) -> None:
    """``error: <one line>`` on stderr; in debug mode the traceback with every cause first."""
    if debug_enabled():
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    line = cli_message(text if text is not None else str(exc), command)
    click.echo(f"error: {line}", err=True)
