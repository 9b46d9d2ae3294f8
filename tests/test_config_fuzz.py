"""The config fuzzer in the test suite: thousands of mutated configs, each a Config or a
ConfigError (never another exception), each load within the reader's 2 s bound, and no
ssh_pass value ever shown.  Bounded to 60 s; `make fuzz-config` runs 10,000."""

from __future__ import annotations

import pytest

from fuzz import config_fuzz


def test_mutated_configs_give_only_config_errors():
    figures = config_fuzz.run(count=3000, seconds=40, seed=12)
    print(figures.line())
    assert figures.tried >= 1000, figures.line()        # thousands on an idle machine
    assert figures.accepted and figures.rejected
    assert not figures.exceptions, figures.exceptions[0]
    assert not figures.secrets, figures.secrets[0][:500]
    assert figures.slowest < config_fuzz.LOAD_BOUND, figures.line()


def test_fuzzer_reports_a_checker_bug(monkeypatch):
    """The fuzzer sees an exception the guarded entry points would turn into a ConfigError."""
    def broken(*args, **kw):
        raise KeyError("checker bug")
    monkeypatch.setattr(config_fuzz.cfgmod, "_parse", broken)
    figures = config_fuzz.run(count=3, seconds=10)
    assert len(figures.exceptions) == 3 and "KeyError: 'checker bug'" in figures.exceptions[0]
    assert not figures.ok and config_fuzz.main(["--count", "2"]) == 1


@pytest.mark.parametrize("name,text", list(config_fuzz.big_shapes()),
                         ids=[n for n, _ in config_fuzz.big_shapes()])
def test_one_megabyte_shapes(name, text):
    figures = config_fuzz.Figures()
    config_fuzz.check_one(text, figures)
    print(name, figures.line())
    assert not figures.exceptions and figures.slowest < config_fuzz.LOAD_BOUND
