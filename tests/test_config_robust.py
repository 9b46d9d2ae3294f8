"""Hostile config files: every problem is a ConfigError with file:line:col, nothing else
escapes, no message shows any text of an `ssh_pass` value, and `--check` survives a closed
pipe and any terminal encoding."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsp_proxy.config import ConfigError, format_summary, load, parse_text

REPO = Path(__file__).resolve().parents[1]
BASE = "lb node0 { nodeid 0; };\nserver node1 { nodeid 1; };\n"


def issues_of(text: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "t.cfg", **kw)
    for issue in info.value.issues + info.value.warnings:
        assert str(issue).startswith("t.cfg"), issue
    return info.value


@pytest.mark.parametrize("digits", [10, 4301, 100_000])
def test_huge_integers_are_range_errors(digits):
    err = issues_of(f"server node1 {{ nodeid {'9' * digits}; }};\n")
    (e,) = err.issues
    assert (e.line, e.col) == (1, 23) and "is out of range 0..31" in e.message
    assert len(e.message) < 200                  # the number is not echoed in full


@pytest.mark.parametrize("text,where,part", [
    ('server node1 { nodeid 1; rname "a\x00b"; };', (1, 32), "control character U+0000"),
    ('server node1 { nodeid 1; rname "a\\0b"; };', (1, 32), "control character U+0000"),
    ("server node\x1b1 { nodeid 1; };", (1, 12), "unexpected control character \\x1b"),
    ('server "node\x1b1" { nodeid 1; };', (1, 8), "control character U+001B"),
    ('lb node0 { nodeid 0; vm_start "run\x07.sh"; };\nserver node1 { nodeid 1; };',
     (1, 31), "control character U+0007"),
    ('server node1 { nodeid 1; node_image "a\\x1bb"; };', (1, 37), "control character U+001B"),
    ("server node1 { nodeid 1; rname a\x85b; };", (1, 32), "control character U+0085"),
    ("server node1 { nodeid 1; }\x00;", (1, 27), "unexpected control character \\x00"),
])
def test_control_characters_rejected_everywhere(text, where, part):
    errs = issues_of(text).issues
    assert any((e.line, e.col) == where and part in e.message for e in errs), errs
    assert all("\x00" not in str(e) and "\x1b" not in str(e) for e in errs)


def test_messages_never_hold_control_characters():
    err = issues_of(BASE + "service \x1bsvc { ext_ep 5; };\nservice '\x1bsvc' { ext_ep 5; };\n")
    assert len(err.issues) >= 3
    assert all(text.isprintable() for text in map(str, err.issues + err.warnings))


def test_bad_utf8_and_nul_bytes_in_a_file(tmp_path):
    p = tmp_path / "bad.cfg"
    p.write_bytes(b"server node1 { nodeid 1; rname \xff\xfe; };\x00\n")
    err = pytest.raises(ConfigError, load, p).value
    assert [(e.line, e.col) for e in err.issues] == [(1, 32), (1, 38)]
    assert "not valid UTF-8 (byte 0xFF)" in err.issues[0].message


@pytest.mark.parametrize("text", [
    "{" * 5000, "}" * 5000, "server a " + "{" * 5000, "x;" * 5000,
    "lb l { nodeid 0; " + "x;" * 5000 + "};\nserver s { nodeid 1; };",
    'server a { nodeid 1; rname "' + "\\" * 5001, "server a { nodeid 1; rname " + "a" * 100000,
    "server s { nodeid 1; " + "batch YES " * 20000 + "};",          # no recursion per keyword
    "lb l { nodeid 0; " + "ssh_pass " * 20000 + "};\nserver s { nodeid 1; };",
    "server s { nodeid 1; " + "batch YES { } " * 10000 + "};",
])
def test_pathological_shapes_give_bounded_reports(text):
    try:
        cfg = parse_text(text, "t.cfg")
    except ConfigError as err:
        assert len(err.issues) <= 101 and len(err.warnings) <= 101
        assert len(str(err)) < 60_000
    else:
        assert len(cfg.warnings) <= 101


def test_issue_count_is_capped_with_a_note():
    err = issues_of("x;" * 1000)
    assert len(err.issues) == 101 and err.issues[0].message == "900 more errors not shown"


# --------------------------------------------------------------------------------------------
# ssh_pass: never any text of its value, also when malformed
# --------------------------------------------------------------------------------------------

SECRET_CASES = [
    "ssh_pass ; Zq9SECRETpw;",
    "ssh_pass Zq9;SECRETpw;",
    "ssh_pass Zq9}SECRETpw;",
    "ssh_pass Zq9{SECRETpw};",
    "ssh_pass Zq9 SECRETpw;",
    "ssh_pass Zq9,SECRETpw;",
    'ssh_pass "Zq9SECRETpw;',
    "ssh_pass\n  Zq9SECRETpw nodeid;",
    "ssh_pass Zq9\x01SECRETpw;",
    "ssh_pass Zq9\xffSECRETpw;",
    "ssh_pass Zq9;SECRETpw; server Zq9SECRETpw { nodeid 7; };",
    "ssh_pass ; server Zq9SECRETpw { nodeid 7; };",
    "ssh_pass Zq9SECRETpw; ssh_pass Zq9SECRETpw;",
    "ssh_pass {Zq9SECRETpw};",
    "ssh_pass Zq9#SECRETpw;;",
]


@pytest.mark.parametrize("stmt", SECRET_CASES)
def test_ssh_pass_text_is_never_shown(stmt, caplog):
    text = (f"lb node0 {{\n  nodeid 0;\n  ssh_host h;\n  {stmt}\n  vm_start x;\n}};\n"
            "server node1 { nodeid 1; };\n")
    caplog.set_level(logging.DEBUG, logger="dsp_proxy")
    for strict in (False, True):
        try:
            cfg = parse_text(text, "t.cfg", local_node=1, strict=strict)
        except ConfigError as err:
            shown = str(err) + repr(err.issues) + repr(err.warnings)
        else:
            shown = format_summary(cfg, 1) + repr(cfg) + "\n".join(map(str, cfg.warnings))
            assert "config t.cfg" in caplog.text  # the parser's own log is captured
        for part in ("Zq9", "SECRET"):
            assert part not in shown, shown
            assert part not in caplog.text


def test_clean_ssh_pass_on_one_line_with_other_statements():
    cfg = parse_text('lb l { nodeid 0; ssh_host h; ssh_pass pw; vm_start "x"; vm_stop "x"; '
                     'vm_status "x"; }; server s { nodeid 1; node_image "i"; };')
    assert cfg.lb.ssh_pass == "pw" and cfg.lb.vm_start == "x"


# --------------------------------------------------------------------------------------------
# --check: closed pipe, any encoding, --strict
# --------------------------------------------------------------------------------------------


def run_closing(cmd: list[str], closed: str, env: dict | None = None) -> tuple[int, bytes]:
    """Run `cmd` with the reader of its `closed` stream ("stdout" or "stderr") gone before
    anything is written; returns the exit status and what the other stream carried."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    gone, kept = (proc.stdout, proc.stderr) if closed == "stdout" else (proc.stderr, proc.stdout)
    try:
        gone.close()
        out = kept.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kept.close()
    return proc.returncode, out


def run_check(path: Path, *extra: str, env: dict | None = None,
              close_stdout: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsp_proxy", "--check", str(path), *extra]
    full_env = {**os.environ, **(env or {})}
    if not close_stdout:
        return subprocess.run(cmd, capture_output=True, env=full_env, timeout=60)
    rc, err = run_closing(cmd, "stdout", full_env)
    return subprocess.CompletedProcess(cmd, rc, b"", err)


def test_check_survives_a_closed_pipe(tmp_path):
    p = tmp_path / "big.cfg"
    nodes = "".join(f"client node{i} {{ nodeid {i}; }};\n" for i in range(2, 32))
    p.write_text("lb node0 { nodeid 0; };\nserver srv { nodeid 1; };\n" + nodes)
    res = run_check(p, close_stdout=True)
    assert b"Traceback" not in res.stderr and b"BrokenPipe" not in res.stderr, res.stderr
    # the issues go to stderr: its reader is gone before they are written.  That stream cannot
    # show a traceback any more, so check() runs under a wrapper that reports on stdout what
    # escaped it
    bad = tmp_path / "bad.cfg"
    bad.write_text("x;" * 500)
    wrapper = ("import sys\nfrom dsp_proxy.main import main\ntry:\n    rc = main(sys.argv[1:])\n"
               "except BaseException as exc:\n    print('ESCAPED', repr(exc), flush=True)\n"
               "    rc = 99\nprint('STATUS', rc, flush=True)\nsys.exit(rc)\n")
    rc, out = run_closing([sys.executable, "-c", wrapper, "--check", str(bad)], "stderr")
    assert out == b"STATUS 1\n" and rc == 1, (out, rc)


def test_check_prints_on_any_terminal_encoding(tmp_path):
    p = tmp_path / "u.cfg"
    p.write_bytes("server n\u0153ud { nodeid 1; rname caf\u00e9.example; };\n".encode())
    res = run_check(p, env={"PYTHONIOENCODING": "ascii:strict", "LC_ALL": "C"})
    assert res.returncode == 0 and b"n\\u0153ud" in res.stdout, res.stderr
    p.write_bytes(b"server n\xc5\x93ud { nodeid 1; rname h\xe9te; };\n")
    res = run_check(p, env={"PYTHONIOENCODING": "ascii:strict"})
    assert res.returncode == 1 and b"Traceback" not in res.stderr
    assert b"not valid UTF-8 (byte 0xE9)" in res.stderr


def test_check_strict_turns_warnings_into_errors(tmp_path):
    p = tmp_path / "w.cfg"
    p.write_text(textwrap.dedent("""\
        lb node0 { nodeid 0; lowater 30; };
        server node1 { nodeid 1; batch Yesterday; };
        """))
    res = run_check(p)
    assert res.returncode == 0 and b"2 warning(s)" in res.stdout
    res = run_check(p, "--strict")
    assert res.returncode == 1
    assert res.stderr.decode().splitlines() == [
        f"{p}:1:22: error: unknown keyword 'lowater' in lb block 'node0' (did you mean "
        "'lowwater'?); expected one of: nodeid, lowwater, highwater, period, hello_time, start, "
        "stop, min_servers, max_servers, cltname, svrname, vm_start, vm_stop, vm_status, "
        "ssh_host, ssh_user, ssh_pass, session_timeout, max_sessions, fd_interval, fd_fall, "
        "fd_rise, lb_eps; the statement is ignored (as by the C daemon)",
        f"{p}:2:32: error: 'batch' expects YES or NO, found 'Yesterday': read as YES, as the C "
        "daemon does (it compares only the first letters)"]
