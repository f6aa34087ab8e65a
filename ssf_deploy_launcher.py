"""The ``ssf-deploy`` console script: Ctrl-C is one clean line from the first instant.

Importing the CLI takes seconds: the ``ssf_deploy`` package imports torch, timm and most of the
library eagerly (on purpose: ``ssf_deploy.fuse`` must stay the function, never become the
submodule). A SIGINT in that window used to print a 60-100-line traceback from inside torch's
import and kill the process by the signal. This module is tiny and lives *outside* the package,
so importing it imports nothing heavy:

1. it installs a SIGINT handler that prints ``error: interrupted`` and exits 130 at once (there
   is nothing to clean up yet: no output has been opened);
2. it imports the CLI (torch, ...);
3. it restores Python's default handling (``KeyboardInterrupt``), which the CLI turns into the
   same line after its cleanup (temp files removed, nothing half-written left). SIGTERM (``kill``,
   ``timeout``, ``docker stop``) is handled the same way in single-process runs: ``error:
   terminated``, exit 143, temp files removed.

``python -m ssf_deploy`` (and ``-m ssf_deploy.tools``, ``-m ssf_deploy.tools.train`` for
torchrun) must import the package before its ``__main__`` runs; the package's ``__init__`` calls
:func:`guard` first thing when it sees it is being imported for one of those, so the same holds
there.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["main", "guard", "release", "CLI_MODULES", "EXIT_INTERRUPTED"]

EXIT_INTERRUPTED = 130          # = ssf_deploy.errors.EXIT_INTERRUPTED (not imported: too heavy)
CLI_MODULES = ("ssf_deploy", "ssf_deploy.tools", "ssf_deploy.tools.train")

_state = {"installed": False}


def _interrupted(signum, frame):   # pragma: no cover - runs in the signal's context
    try:
        os.write(2, b"error: interrupted\n")
    finally:
        os._exit(EXIT_INTERRUPTED)


def guard() -> None:
    """Until :func:`release`: a SIGINT prints ``error: interrupted`` and exits 130 at once.

    Only replaces Python's default handler (a SIGINT that is ignored, e.g. under ``nohup``, or
    a handler someone else installed, stays as it is) and only in the main thread."""
    if _state["installed"]:
        return
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted)
            _state["installed"] = True
    except ValueError:             # not the main thread
        pass


def release() -> None:
    """Back to Python's default SIGINT handling (``KeyboardInterrupt``)."""
    if _state["installed"] and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _state["installed"] = False


def cli_module_being_run() -> bool:
    """True while ``python -m ssf_deploy[.tools[.train]]`` imports the package to run it."""
    if sys.argv[:1] != ["-m"]:       # Python's value while it locates a -m module
        return False
    args = list(getattr(sys, "orig_argv", []))[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m":
            return i + 1 < len(args) and args[i + 1] in CLI_MODULES
        if a.startswith("-m"):
            return a[2:] in CLI_MODULES
        if a in ("-c", "-") or not a.startswith("-"):
            return False
        i += 2 if a in ("-X", "-W", "--check-hash-based-pycs") else 1
    return False


def _terminate_handler():
    from ssf_deploy.errors import Terminated

    def handler(signum, frame):
        raise Terminated()
    return handler


def main(argv=None) -> int:
    """Run the CLI (``argv`` default: ``sys.argv[1:]``); returns the exit code."""
    guard()
    from ssf_deploy.tools import main as cli_main
    try:
        release()
        # a SIGTERM'd run cleans up like an interrupted one; not under torchrun, whose agent
        # terminates workers itself and must not wait for their cleanup
        if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1") and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            try:
                signal.signal(signal.SIGTERM, _terminate_handler())
            except ValueError:     # not the main thread
                pass
        return cli_main(argv)
    except KeyboardInterrupt:      # between release() and the CLI's own handling
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
