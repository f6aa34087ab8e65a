"""Errors: the library names arguments, the CLI shows its own flags, one line per failure and
the documented exit codes; ``--debug`` / ``SSF_DEPLOY_DEBUG=1`` add the whole cause chain."""
from __future__ import annotations

import pytest

from ssf_deploy.errors import CheckpointError, UsageError
from ssf_deploy.tools import main
from ssf_deploy.tools._errors import cli_message, flag_for


def _cmd(name):
    from ssf_deploy.tools import cli
    import click
    return cli.get_command(click.Context(cli), name)


def test_argument_names_become_the_commands_flags():
    engine, refit, quantize = _cmd("engine"), _cmd("refit"), _cmd("quantize")
    assert flag_for(engine, "workspace_gb") == "--workspace-gb"
    assert flag_for(engine, "inputs") == "--inputs"          # option dest inputs_spec
    assert flag_for(refit, "onnx") == "--onnx"               # option dest onnx_opt
    assert flag_for(quantize, "target") == "--for"           # another name entirely
    assert flag_for(quantize, "arch") == "--model"
    assert flag_for(engine, "arch") is None                  # engine has no such flag
    assert cli_message("need 1 <= `min_batch` <= `opt_batch`, give `arch`", engine) == \
        "need 1 <= --min-batch <= --opt-batch, give `arch`"


def test_library_messages_name_arguments_not_flags(tmp_path):
    from ssf_deploy.engine import build_checked_engine
    from ssf_deploy.quantize import quantize_onnx
    with pytest.raises(UsageError) as e:
        build_checked_engine("m.onnx", str(tmp_path / "m.plan"), workspace_gb=0)
    assert str(e.value) == "`workspace_gb` must be > 0"
    with pytest.raises(UsageError) as e:
        quantize_onnx("m.onnx", None, min_agreement=0.5)
    assert "`min_agreement`" in str(e.value) and "--" not in str(e.value)


def _bad_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage")
    return str(bad)


def test_one_line_by_default_the_cause_chain_with_debug(tmp_path, capsys, monkeypatch):
    bad = _bad_onnx(tmp_path)
    assert main(["quantize", bad, "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read ONNX file") and len(err.strip().splitlines()) == 1
    assert main(["--debug", "quantize", bad, "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("error: cannot read ONNX file")
    text = "\n".join(err)
    assert "DecodeError" in text and "direct cause of the following exception" in text
    assert CheckpointError.__name__ in text
    monkeypatch.setenv("SSF_DEPLOY_DEBUG", "1")
    assert main(["quantize", bad, "--latency-runs", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SSF_DEPLOY_DEBUG", "0")
    assert main(["quantize", bad, "--latency-runs", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_flags_in_cli_errors(tmp_path, capsys):
    bad = _bad_onnx(tmp_path)
    assert main(["quantize", bad, "--min-agreement", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --min-agreement is a percentage (e.g. 99), got 0.5"
