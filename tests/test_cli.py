"""The command line's parser: every option documented, sampling options passed on only when given."""

import argparse

from jaxinfer.cli import _parser
from jaxinfer.commands.client import _request
from jaxinfer.commands.sampling_args import given_sampling_options


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
