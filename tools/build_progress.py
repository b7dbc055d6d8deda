"""Runs a build command and shows its progress, not its noise: `make build` runs pip through it.

`pip install -v` prints everything setuptools and ninja say, each compile as a command line of
a thousand characters; `pip -q` prints nothing for minutes. Shown here, as they come:
  - ninja's steps as "[3/13] csrc/cpu/xent_cpu.cpp", so one sees what compiles and how far along
    (ninja writing to a pipe reports each step when it ends: during a long compile, a line
    every HEARTBEAT_S seconds says the build is still going);
  - the link, and the lines setup.py addresses to the user ("xent_ext: ...");
  - compiler and ptxas warnings and errors.
Everything goes to build/make/build.log; when the command fails, its last lines are printed too.
The exit status is the command's.

Usage: python tools/build_progress.py COMMAND [ARG...]
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "build" / "make" / "build.log"
TAIL_ON_FAILURE = 80
HEARTBEAT_S = 30

NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
COMPILED = re.compile(r"\s-c\s+(\S+\.(?:cpp|cu|cc|c))\b")
DIAGNOSTIC = re.compile(r"\b(warning|error)\s*:|^\s*error\b|FAILED:", re.IGNORECASE)


def shown(line: str) -> str | None:
    """The text to show for one output line, or None to keep it in the log only."""
    step = NINJA_STEP.match(line)
    if step:
        done, total, command = step.groups()
        source = COMPILED.search(command)
        what = os.path.relpath(source.group(1), ROOT) if source else command[:100]
        return f"[{done}/{total}] {what}"
    stripped = line.strip()
    if stripped.startswith("xent_ext:") or stripped == "ninja: no work to do.":
        return stripped
    if " -shared " in line and " -o " in line:
        return "linking " + os.path.basename(line.rsplit(" -o ", 1)[1].split()[0])
    if DIAGNOSTIC.search(line) and "ptxas info" not in line:
        return line.rstrip()
    return None


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    LOG.parent.mkdir(parents=True, exist_ok=True)
    began = quiet_since = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    pending: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, pending), daemon=True).start()
    with open(LOG, "w") as log:
        while True:
            try:
                line = pending.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                now = time.monotonic()
                print(f"  ... still building ({now - began:.0f} s so far, {now - quiet_since:.0f}"
                      " s since the last step)", flush=True)
                continue
            if line is None:
                break
            log.write(line)
            lines.append(line)
            text = shown(line)
            if text is not None:
                print(text, flush=True)
                quiet_since = time.monotonic()
    rc = proc.wait()
    took = time.monotonic() - began
    if rc != 0:
        print(f"build failed ({rc}) after {took:.0f} s; its last lines:", file=sys.stderr)
        sys.stderr.writelines(lines[-TAIL_ON_FAILURE:])
        print(f"full log: {os.path.relpath(LOG)}", file=sys.stderr)
    else:
        print(f"build done in {took:.0f} s (log: {os.path.relpath(LOG)})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
