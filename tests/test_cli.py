"""The command line's parser: every option documented, bad values refused by name, sampling options passed on
only when given."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from jaxinfer.cli import _parser
from jaxinfer.commands.client import _request
from jaxinfer.commands.sampling_args import given_sampling_options
from jaxinfer.errors import RequestError


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, path + (name,))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help():
    options = list(_options(_parser()))
    assert len(options) > 80
    assert [(" ".join(path), action.dest) for path, action in options if not action.help] == []


def test_sampling_options_are_passed_on_only_when_given():
    args = _parser().parse_args(["generate", "--prompt", "hi", "--top-k", "5", "--seed", "7", "--temperature", "0"])
    assert given_sampling_options(args) == {"top_k": 5, "seed": 7, "temperature": 0.0}
    args = _parser().parse_args(["client", "--chat", "hi", "--top-p", "0.5", "--max-tokens", "3"])
    sampling = _request(args).sampling
    assert (sampling.top_p, sampling.max_tokens) == (0.5, 3)
    assert not any(sampling.HasField(name) for name in ("temperature", "top_k", "seed"))


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "seed=-1: must be in [0, 2**63)"), ("--max-tokens", "2147483648", "max_tokens=2147483648"),
    ("--top-k", "3000000000", "top_k=3000000000"), ("--temperature", "nan", "temperature=nan")])
def test_client_refuses_a_sampling_value_by_name_before_sending(flag, value, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        _request(_parser().parse_args(["client", "--prompt", "hi", flag, value]))


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "argument --port: port 70000 is above 65535"),
    (["serve", "--max-queued-requests", "0"], "argument --max-queued-requests: '0' must be > 0"),
    (["serve", "--drain-timeout", "-1"], "argument --drain-timeout: '-1' must be >= 0"),
    (["serve", "--tls-cert", "no/cert.pem"], "argument --tls-cert: no/cert.pem is not a file"),
    (["client", "--prompt", "hi", "--timeout", "0"], "argument --timeout: '0' must be > 0"),
    (["client", "--prompt", "hi", "--auth-token-file", "no/tok"], "argument --auth-token-file: no/tok is not a file"),
    (["eval", "perplexity", "--windows", "0"], "argument --windows: '0' must be > 0"),
    (["roofline", "--bandwidth", "-3"], "argument --bandwidth: '-3' must be > 0"),
    (["roofline", "--flops", "nan"], "argument --flops: 'nan' must be > 0"),
    (["roofline", "--context", "1.5"], "argument --context: '1.5' is not an int"),
    (["roofline", "--dtype", "int5"], "argument --dtype: invalid choice: 'int5'"),
    (["roofline", "--kv-dtype", "int4"], "argument --kv-dtype: invalid choice: 'int4'"),
])
def test_bad_values_are_refused_by_name_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_bad_kernel_isa_variable_is_an_error_line_not_a_traceback():
    """The variable is read where the kernels' modules load: in a fresh process, at the command's import."""
    env = {**os.environ, "JAXINFER_CPU_ISA": "avx3"}
    for argv in (["generate", "--prompt", "hi"], ["roofline", "--bandwidth", "30"]):
        run = subprocess.run([sys.executable, "-m", "jaxinfer.cli", *argv], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().endswith("error: JAXINFER_CPU_ISA='avx3': set it to avx2 (the kernels' AVX2 "
                                           "builds) or unset it")
        assert "Traceback" not in run.stderr


@pytest.mark.parametrize("flags, enabled", [([], True), (["--no-prefix-caching"], False)])
def test_serve_passes_the_prefix_cache_choice_to_the_engine(monkeypatch, flags, enabled):
    from jaxinfer.commands import serve

    created = []
    monkeypatch.setattr(serve, "create_engine", lambda model, **kwargs: created.append((model, kwargs)))
    args = _parser().parse_args(["serve", "engines/x", *flags])
    serve._load_engine(args.engine_dir, args.enable_prefix_caching)
    assert created == [("engines/x", {"background": True, "enable_prefix_caching": enabled})]
