"""Method options for every tool that builds a tuned model (params, train, bench).

Derived from the tuners' Config fields (``metadata={"cli": ..., "help": ...}``): a new method or
option needs no edit here.
"""
from __future__ import annotations

import dataclasses

import click

from ..tuners import METHODS, get_tuner, tuners


def _dest(cli: str) -> str:
    return cli.lstrip("-").replace("-", "_")


def _fields(tuner) -> list:
    return [f for f in dataclasses.fields(tuner.Config) if f.metadata.get("cli")]


def _click_option(f):
    md = f.metadata
    if "flag" in md:
        return click.option(md["cli"], _dest(md["cli"]), is_flag=True, default=False,
                            help=md.get("help"))
    kind = None
    if md.get("choices"):
        kind = click.Choice(list(md["choices"]))
    elif not md.get("csv") and isinstance(f.default, (int, float)) and \
            not isinstance(f.default, bool):
        kind = type(f.default)
    elif f.type in ("Optional[int]", "int"):
        kind = int
    return click.option(md["cli"], _dest(md["cli"]), type=kind, default=None,
                        help=md.get("help"))


def method_options(fn):
    """Decorate a click command with every method's options (each name once)."""
    seen = {}
    for tuner in tuners():
        for f in _fields(tuner):
            seen.setdefault(f.metadata["cli"], f)
    for f in reversed(list(seen.values())):
        fn = _click_option(f)(fn)
    return fn


def parse_method_options(method: str, raw: dict) -> dict:
    """The options of ``method`` that were given; unset ones keep the method's defaults."""
    opts = {}
    for f in _fields(get_tuner(method)):
        md = f.metadata
        value = raw.get(_dest(md["cli"]))
        if "flag" in md:
            if value:
                opts[f.name] = md["flag"]
        elif value is not None:
            opts[f.name] = tuple(x.strip() for x in str(value).split(",") if x.strip()) \
                if md.get("csv") else value
    return opts


__all__ = ["METHODS", "method_options", "parse_method_options"]
