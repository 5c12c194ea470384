#!/usr/bin/env python3
"""Fails if a tracked source, test or script names a path that climbs out of the repository.

A checkout must work wherever it is cloned, with no sibling folders: every file a test, build
script, script or benchmark reads lives in the repository. This finds every relative path with
`../` in the tracked .rs, .sh, .py, .toml and .yml files and resolves it from each place it could
be relative to (after `CARGO_MANIFEST_DIR`: the crate's folder; other Rust paths: the file's or
the crate's folder; scripts: their folder or the repository root); a path that leaves the
repository from all of them is reported, with its file and line.

  python3 scripts/check-inside-repo.py      # exit 1 and one line per offending path
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTS = (".rs", ".sh", ".py", ".toml", ".yml", ".yaml")
# A run of path characters holding at least one `../`.
PATH = re.compile(r"[A-Za-z0-9_.\-/]*\.\./[A-Za-z0-9_.\-/]*")


def crate_dir(path):
    d = os.path.dirname(path)
    while d.startswith(ROOT) and d != ROOT:
        if os.path.exists(os.path.join(d, "Cargo.toml")):
            return d
        d = os.path.dirname(d)
    return ROOT


def inside(p):
    p = os.path.normpath(p)
    return p == ROOT or p.startswith(ROOT + os.sep)


def main():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.split()
    bad = []
    for rel in files:
        if not rel.endswith(EXTS) or rel == "scripts/check-inside-repo.py":
            continue
        path = os.path.join(ROOT, rel)
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        here, crate = os.path.dirname(path), crate_dir(path)
        for n, line in enumerate(lines, 1):
            near = " ".join(lines[max(0, n - 3):n])
            if rel.endswith(".rs") and "CARGO_MANIFEST_DIR" in near:
                bases = {crate}  # concat!(env!("CARGO_MANIFEST_DIR"), "/..."), maybe wrapped
            elif rel.endswith(".rs"):
                bases = {here, crate}  # include_str! is file-relative, test paths crate-relative
            else:
                bases = {here, ROOT}  # scripts run from their folder or from the root
            for m in PATH.finditer(line):
                text = m.group(0).lstrip("/")
                if all(not inside(os.path.join(b, text)) for b in bases):
                    bad.append(f"{rel}:{n}: `{m.group(0)}` leaves the repository")
    for b in bad:
        print(b)
    if bad:
        print(f"{len(bad)} path(s) outside the repository: keep what tests and scripts read in it")
        sys.exit(1)
    print("no path leaves the repository")


if __name__ == "__main__":
    main()
