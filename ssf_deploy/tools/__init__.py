"""The ``ssf-deploy`` command line: one tool per pipeline step (Polygraphy-style).

Each subcommand lives in its own module and is imported only when used, so ``ssf-deploy params``
does not pay for onnx/tensorrt imports. CLI modules parse options and print; the work is done by
the library. Exit codes: 0 success, 1 a check failed, 2 usage or bad input (one line on
stderr), 130 interrupted, 143 terminated (see :mod:`ssf_deploy.errors`). Library messages name
arguments (`` `workspace_gb` ``); :mod:`._errors` shows them as the running command's flags, and
``--debug`` (or ``SSF_DEPLOY_DEBUG=1``) adds the whole cause chain. The console script is
``ssf_deploy_launcher:main``, which makes Ctrl-C clean while this package is still importing.
"""
from __future__ import annotations

import importlib

import click

from ..errors import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, SSFDeployError,
                      Terminated, describe_os_error)
from ._errors import DEBUG_ENV, report_failure, set_debug

# name -> (module, attribute, one-line help)
TOOLS = {
    "run": ("run", "run", "Main job: train, fuse, verify, export and report, offline."),
    "params": ("params", "params", "Trainable/total parameters per tuning method (Table 5)."),
    "train": ("train", "train", "Fine-tune a timm model with a tuning method."),
    "fuse": ("fuse", "fuse", "Fold SSF into the base weights, verify, export ONNX."),
    "verify": ("verify", "verify", "Compare unfused vs fused (vs ONNX) outputs: the CI gate."),
    "export": ("export", "export", "Export the plain base model to ONNX with the same settings."),
    "engine": ("engine", "engine", "Build a TensorRT engine from ONNX and check it."),
    "refit": ("refit", "refit", "Refit a TensorRT engine / ONNX Runtime session with a task pack."),
    "bundle": ("bundle", "bundle", "Put N SSF tasks in one model serving mixed-task batches."),
    "serve": ("serve", "serve", "Serve a Triton model repository's bundles (Ray Serve, CPU)."),
    "quantize": ("quantize", "quantize", "Static INT8 (onnxruntime QDQ), checked against fp32."),
    "bench": ("bench", "bench", "Benchmark cost of every tuning method (Fig. 3, Table 2)."),
}


_RUNNING: dict = {}   # the subcommand being run: its flags name the library's arguments


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(TOOLS)

    def get_command(self, ctx, name):
        if name not in TOOLS:
            return None
        mod, attr, _ = TOOLS[name]
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(f"{__name__}."):
                return None
            raise
        _RUNNING["command"] = getattr(module, attr)
        return _RUNNING["command"]

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in TOOLS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ssf-deploy")
@click.option("--debug", is_flag=True,
              help=f"On failure also print the whole cause chain (or set {DEBUG_ENV}=1).")
def cli(debug):
    """SSF from paper to production: train -> fuse -> verify -> export -> engine -> bench."""
    set_debug(debug)


def main(argv=None) -> int:
    _RUNNING.clear()
    set_debug(False)
    try:
        rv = cli.main(args=argv, prog_name="ssf-deploy", standalone_mode=False)
        return int(rv or 0)
    except SSFDeployError as e:
        report_failure(e, _RUNNING.get("command"))
        return e.exit_code
    except click.exceptions.Abort as e:   # click's wrapping of KeyboardInterrupt
        if isinstance(e.__cause__, Terminated):
            click.echo("error: terminated", err=True)
            return EXIT_TERMINATED
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.UsageError as e:   # one line, like every other user error
        hint = f" (see ssf-deploy {e.ctx.info_name} --help)" if e.ctx and e.ctx.parent else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except Terminated:
        click.echo("error: terminated", err=True)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except OSError as e:   # one place maps them all: "disk full writing X", "no permission ..."
        report_failure(e, None, describe_os_error(e, action=None))
        return EXIT_BAD_INPUT
