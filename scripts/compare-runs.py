#!/usr/bin/env python3
"""Compares two folders written by scripts/behaviour-runs.sh (before and after a change): every
log.jsonl line by line without its `seconds`, every results.csv without its time column, the
printed summaries without their times and paths, and the bytes of every tensor file, label and
weight map. Prints what differs and exits 1 if anything does.

    scripts/compare-runs.py BEFORE_DIR AFTER_DIR
"""
import csv
import hashlib
import json
import re
import sys
from pathlib import Path


def log(path):
    lines = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        entry.pop("seconds", None)
        lines.append(entry)
    return lines


def results(path):
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("seconds_per_iteration", None)
    return rows


def summaries(path, root):
    out = []
    for line in path.read_text().splitlines():
        line = line.replace(str(root), "ROOT")
        out.append(re.sub(r"done in [0-9.]+ s", "done in T s", line))
    return out


def checked(name):
    return name in ("log.jsonl", "results.csv", "agreement.json") or name.endswith(
        (".safetensors", ".nii.gz")
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(before, after):
    problems = []
    compared = {"log lines": 0, "files": 0}
    names = sorted({p.relative_to(before) for p in before.rglob("*") if p.is_file()})
    for rel in names:
        a, b = before / rel, after / rel
        kind = rel.name
        if not checked(kind):
            continue
        if not b.exists():
            problems.append(f"{rel}: missing after")
            continue
        compared["files"] += 1
        if kind == "log.jsonl":
            la, lb = log(a), log(b)
            compared["log lines"] += len(la)
            if len(la) != len(lb):
                problems.append(f"{rel}: {len(la)} lines before, {len(lb)} after")
            for x, y in zip(la, lb):
                if x != y:
                    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                    problems.append(
                        f"{rel} step {x.get('step')}: "
                        + ", ".join(f"{k} {x.get(k)} -> {y.get(k)}" for k in keys)
                    )
                    break
        elif kind == "results.csv":
            if results(a) != results(b):
                problems.append(f"{rel}: {results(a)} -> {results(b)}")
        elif kind == "agreement.json":
            if json.loads(a.read_text()) != json.loads(b.read_text()):
                problems.append(f"{rel} differs")
        elif digest(a) != digest(b):
            problems.append(f"{rel}: bytes differ")
    extra = sorted(
        p.relative_to(after)
        for p in after.rglob("*")
        if p.is_file() and checked(p.name) and not (before / p.relative_to(after)).exists()
    )
    problems += [f"{rel}: only after" for rel in extra]
    sa, sb = summaries(before / "stdout.txt", before), summaries(after / "stdout.txt", after)
    if sa != sb:
        for x, y in zip(sa, sb):
            if x != y:
                problems.append(f"stdout: {x!r} -> {y!r}")
        if len(sa) != len(sb):
            problems.append(f"stdout: {len(sa)} lines before, {len(sb)} after")
    print(
        f"compared {compared['files']} files ({compared['log lines']} log lines) "
        f"and {len(sa)} printed lines"
    )
    for p in problems:
        print("DIFFERS:", p)
    if not problems:
        print("identical (times aside)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
