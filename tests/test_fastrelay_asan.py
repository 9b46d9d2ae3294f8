"""The compiled relay under AddressSanitizer and UBSan, bounded (`make fuzz-relay-asan` is the
long run).

fastrelay.c is built with the sanitizers (`fastrelay_build --sanitize`) in a copy of the
package, so the source tree is left as it is; then, with the ASan runtime preloaded and
`DSP_FASTRELAY_SANITIZED=1`, the relay fuzzer compares the relay with the router on 50,000
frames, the hostile-peer tests feed its read loop, and the node tests drive the compiled
sender and deliverer, also against a hostile peer and a failing node kernel
(tests/test_fastpath_node.py, tests/test_fastpath_node_hostile.py), and local clients'
sessions in them (tests/test_fastpath_lb.py, tests/test_fastpath_lb_hostile.py).  Any
sanitizer report (an out-of-bounds access, an overflow, a shift too far) aborts the process
and fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dsp_proxy import fastpath
from dsp_proxy.cluster import REPO_ROOT


def _libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(fastpath.lib is None, reason="the compiled relay is not built")
def test_the_relay_under_sanitizers(tmp_path):
    asan = _libasan()
    if asan is None:
        pytest.skip("gcc's libasan.so is not installed")
    shutil.copytree(REPO_ROOT / "dsp_proxy", tmp_path / "dsp_proxy",
                    ignore=shutil.ignore_patterns("__pycache__", "_fastrelay*"))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO_ROOT}")
    built = subprocess.run([sys.executable, "-m", "dsp_proxy.fastrelay_build", "--sanitize"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert list((tmp_path / "dsp_proxy").glob("_fastrelay_san*.so")), built.stderr
    env.update({fastpath.SANITIZED: "1", "LD_PRELOAD": asan, "PYTHONMALLOC": "malloc",
                "ASAN_OPTIONS": "detect_leaks=0",
                "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})
    fuzz = subprocess.run([sys.executable, "-m", "fuzz.relay_fuzz", "--frames", "50000",
                           "--seconds", "240"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = fuzz.stdout + fuzz.stderr
    assert fuzz.returncode == 0 and "mismatches 0" in out, out[-4000:]
    # --capture=sys: a report the sanitizer writes to descriptor 2 before it aborts the
    # process reaches the output here (pytest's own capture of the descriptor would lose it)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--capture=sys", "-o", f"rootdir={REPO_ROOT}",
                            str(REPO_ROOT / "tests" / "test_fastrelay_hostile.py"),
                            # the node's compiled sender and deliverer (not the cluster run)
                            str(REPO_ROOT / "tests" / "test_fastpath_node.py"),
                            str(REPO_ROOT / "tests" / "test_fastpath_node_hostile.py"),
                            str(REPO_ROOT / "tests" / "test_fastpath_lb.py"),
                            str(REPO_ROOT / "tests" / "test_fastpath_lb_hostile.py"),
                            "-k", "not same_traffic"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = tests.stdout + tests.stderr
    assert tests.returncode == 0 and " passed" in out, out[-4000:]
    assert "Sanitizer" not in out and "runtime error" not in out, out[-4000:]
