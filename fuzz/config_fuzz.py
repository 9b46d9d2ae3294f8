"""Config fuzzer: mutated config files must give a Config or a ConfigError, nothing else.

    python -m fuzz.config_fuzz [--count N] [--seconds S] [--seed X] [--big]

Each round takes one of the repository's config files (examples/ and tests/data/), applies
one to four random mutations (bytes inserted, deleted or replaced with the characters the
language cares about, control characters, undecodable bytes, huge numbers, duplicated or
dropped lines, keywords out of place, long repetitions such as ``x;`` or ``{``) and checks the
result with the unguarded reader, so a checker bug shows as the exception it is.  It also
checks that the seed's ssh_pass value never appears in a message or summary while the file
still gives it as an ``ssh_pass`` value.  ``--big`` adds 1 MB shapes.  Prints: configs tried,
accepted, rejected, the maximum and mean time of one load, exceptions other than ConfigError,
secrets shown; exit status 1 if any exception, any secret shown, or any load over 2 s.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsp_proxy import config as cfgmod

REPO = Path(__file__).resolve().parents[1]
SECRET = "Zq9FUZZpw"
LOAD_BOUND = 2.0
"""CPU seconds one load may take (the bound the config checker is built for).  CPU time of the
loading thread, not wall-clock time, so that a busy machine does not make a fast reader fail."""

_SPECIAL = ["", ";", "{", "}", '"', "'", "#", "//", "\\", "\n", " ", "\t", ",", "\x00",
            "\x1b", "\x7f", "\u0085", "\xff", "\udcff", "0x1", "-1", "9" * 5000, "1.5",
            "30s", "Yes", "nope", "ssh_pass", "nodeid", "proxyid", "server", "lb", "{{}}"]
_KEYWORDS = sorted({k for t in cfgmod._KEYWORDS.values() for k in t})


def seeds() -> list[str]:
    """The config files of the repository, with a known ssh_pass value."""
    files = sorted((REPO / "examples").glob("*.cfg")) + sorted((REPO / "tests/data").glob("*.cfg"))
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="surrogateescape")
        out.append(re.sub(r"(ssh_pass\s+)\S+?;", rf"\g<1>{SECRET};", text))
    return out


def _pos(rng: random.Random, text: str) -> int:
    return rng.randrange(len(text) + 1)


def _m_insert(rng: random.Random, t: str) -> str:
    p = _pos(rng, t)
    piece = rng.choice(_SPECIAL + _KEYWORDS)
    return t[:p] + piece + t[p:]


def _m_delete(rng: random.Random, t: str) -> str:
    p = _pos(rng, t)
    return t[:p] + t[p + rng.randint(1, 40):]


def _m_replace(rng: random.Random, t: str) -> str:
    p = _pos(rng, t)
    return t[:p] + rng.choice(_SPECIAL) + t[p + 1:]


def _m_byte(rng: random.Random, t: str) -> str:
    p = _pos(rng, t)
    return t[:p] + chr(rng.choice([rng.randrange(0, 32), rng.randrange(0x80, 0x100),
                                   0xdc80 + rng.randrange(128), rng.randrange(32, 127)])) + t[p:]


def _m_lines(rng: random.Random, t: str) -> str:
    lines = t.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.randrange(3)
    if op == 0:
        lines.insert(j, lines[i])
    elif op == 1 and len(lines) > 1:
        del lines[i]
    else:
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _m_number(rng: random.Random, t: str) -> str:
    nums = list(re.finditer(r"\d+", t))
    if not nums:
        return t
    m = rng.choice(nums)
    new = rng.choice(["0", "-1", "4294967296", "9" * rng.choice([10, 4301, 20000]), "00031",
                      "+7", "1e3", str(rng.randrange(-100, 70000))])
    return t[:m.start()] + new + t[m.end():]


def _m_repeat(rng: random.Random, t: str) -> str:
    p = _pos(rng, t)
    unit = rng.choice(["x;", "{", "}", "{ ", ";", "a ", '"', "# c\n", "nodeid 1;", "\\\n",
                       "batch YES ", "ssh_pass ", "nodeid ", "a { } ", "addrs 1.2.3.4 "])
    return t[:p] + unit * rng.choice([10, 1000, 20000]) + t[p:]


def _m_splice(rng: random.Random, t: str, other: str) -> str:
    return t[:_pos(rng, t)] + other[_pos(rng, other):]


MUTATIONS: list[Callable[[random.Random, str], str]] = [
    _m_insert, _m_delete, _m_replace, _m_byte, _m_lines, _m_number, _m_repeat]


def big_shapes() -> Iterator[tuple[str, str]]:
    """1 MB files of the shapes that were slow or fatal before."""
    base = seeds()[0]
    yield "1MB of 'x;'", "lb l { nodeid 0; };\nserver s { nodeid 1; };\n" + "x;" * 512 * 1024
    yield "1MB of 'x;' in a block", ("lb l { nodeid 0; " + "x;" * 500_000
                                      + "};\nserver s { nodeid 1; };")
    yield "1MB of '{'", "{" * 1_000_000
    yield "1MB of 'server a {'", "server a " + "{" * 1_000_000
    yield "1MB of '}'", "}" * 1_000_000
    yield "1MB of config", base * (1_000_000 // len(base) + 1)
    yield "1MB number", "server s { nodeid " + "9" * 1_000_000 + "; };"
    yield "1MB statement of keywords", "server s { nodeid 1; " + "batch YES " * 100_000 + "};"
    yield "1MB of 'ssh_pass '", "lb l { nodeid 0; " + "ssh_pass " * 110_000 + "};"
    yield "1MB of services", "lb l { nodeid 0; };\nserver s { nodeid 1; };\n" + "".join(
        f"service s{i} {{ dcid {i % 32}; ext_ep {i // 32 % 221}; }};\n" for i in range(27_000))
    yield "1MB of node blocks", "lb l { nodeid 0; cltname x; };\n" + "".join(
        f"server node{i} {{ nodeid {i % 32}; rport {3000 + i % 32}; }};\n" for i in range(22_000))
    yield "1MB of NUL", "\x00" * 1_000_000


@dataclass
class Figures:
    tried: int = 0
    accepted: int = 0
    rejected: int = 0
    total: float = 0.0              # CPU seconds of the loads
    slowest: float = 0.0            # CPU seconds of the slowest load
    slowest_wall: float = 0.0       # wall-clock seconds of the slowest load (machine load too)
    slow: int = 0
    exceptions: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    def line(self) -> str:
        mean = self.total / self.tried * 1000 if self.tried else 0.0
        return (f"configs tried {self.tried}, accepted {self.accepted}, rejected {self.rejected}, "
                f"max load {self.slowest * 1000:.1f} ms CPU ({self.slowest_wall * 1000:.1f} ms "
                f"wall), mean {mean:.2f} ms CPU, loads over "
                f"{LOAD_BOUND:.0f} s {self.slow}, exceptions other than ConfigError "
                f"{len(self.exceptions)}, secrets shown {len(self.secrets)}")

    @property
    def ok(self) -> bool:
        return not self.exceptions and not self.secrets and not self.slow


def check_one(text: str, figures: Figures) -> None:
    """Load `text` once with the unguarded reader and record the outcome."""
    start, wall = time.thread_time(), time.perf_counter()
    shown = ""
    try:
        cfg = cfgmod._parse(text, "fuzz.cfg", None, 1, False)
    except cfgmod.ConfigError as err:
        figures.rejected += 1
        shown = str(err)
    except Exception:                                   # the finding this fuzzer looks for
        figures.exceptions.append(traceback.format_exc())
    else:
        figures.accepted += 1
        shown = cfgmod.format_summary(cfg, 1) + repr(cfg)
    took = time.thread_time() - start
    figures.tried += 1
    figures.total += took
    figures.slowest = max(figures.slowest, took)
    figures.slowest_wall = max(figures.slowest_wall, time.perf_counter() - wall)
    if took > LOAD_BOUND:
        figures.slow += 1
    if SECRET in shown and re.search(rf"ssh_pass[ \t]+{SECRET}", text) and text.count(SECRET) == 1:
        figures.secrets.append(text)


def run(count: int, seconds: float, seed: int = 0, big: bool = False) -> Figures:
    """Fuzz `count` configs or for `seconds`, whichever ends first."""
    rng = random.Random(seed)
    pool = seeds()
    figures = Figures()
    deadline = time.monotonic() + seconds
    if big:
        for _, text in big_shapes():
            check_one(text, figures)
    while figures.tried < count and time.monotonic() < deadline:
        text = rng.choice(pool)
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.05:
                text = _m_splice(rng, text, rng.choice(pool))
            else:
                text = rng.choice(MUTATIONS)(rng, text)
        check_one(text, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.config_fuzz", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--count", type=int, default=10_000, help="configs to try (default 10000)")
    p.add_argument("--seconds", type=float, default=600.0, help="time bound (default 600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--big", action="store_true", help="also load 1 MB shapes")
    args = p.parse_args(argv)
    figures = run(args.count, args.seconds, args.seed, args.big)
    print(figures.line())
    for tb in figures.exceptions[:3]:
        print(tb, file=sys.stderr)
    for text in figures.secrets[:3]:
        print("ssh_pass value shown for:", ascii(text[:2000]), file=sys.stderr)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
