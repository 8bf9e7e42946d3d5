#!/usr/bin/env python3
"""dhat_diff.py EARLY.json LATE.json [--frames N] [--top K] - what is live in LATE and not
in EARLY, by allocation site: two heap profiles of roundabout (bench/soak with DHAT=1, runs
of two lengths) compared by the bytes each site holds at the moment the profile was written
(dhat's "t-end").

A site is the allocation's first N frames below the allocator (default 8), file and line,
without addresses, so that the same code path matches in both runs. Prints the sites whose
live bytes differ most, each with its blocks in both runs and its first frame in
roundabout's own code (where the path came from), then the totals. Standard library only.
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ADDRESS = re.compile(r"^0x[0-9a-f]+: ")
FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?):\d+:\d+\)$")
# Files of the allocator itself and of the collections' growth, above the allocation site:
# dhat, the global allocator hook, alloc::alloc, RawVec and hashbrown's raw allocation.
ALLOCATOR = ("dhat-", "dhat_heap.rs", "alloc/src/alloc.rs", "src/raw_vec/", "src/raw/alloc.rs")
ROOT = Path(__file__).resolve().parent.parent


def frames(profile, pp):
    """The frames of an allocation point, the allocator's own cut off: "function (file:line)"
    as dhat prints them with line tables (a function's name without its module)."""
    ftbl = profile["ftbl"]
    names = [ADDRESS.sub("", ftbl[i]) for i in pp["fs"]]
    while names and any(a in names[0] for a in ALLOCATOR):
        names = names[1:]
    return names


def own(name):
    """Whether a frame is in roundabout's own src/ (line tables name it src/..., or
    wt-*/src/... for the crate root), rather than the standard library's src/ or a
    dependency's."""
    m = FRAME.match(name)
    if not m:
        return False
    file = m.group("file")
    rel = file[file.index("src/"):] if "src/" in file else file
    return (ROOT / rel).is_file() and not file.startswith(("alloc/", "core/", "std/"))


def sites(profile, depth):
    """{site: [live bytes, live blocks, total bytes, roundabout's first frame]}."""
    out = defaultdict(lambda: [0, 0, 0, ""])
    for pp in profile["pps"]:
        names = frames(profile, pp)
        site = out[tuple(names[:depth])]
        site[0] += pp["eb"]
        site[1] += pp["ebk"]
        site[2] += pp["tb"]
        if not site[3]:
            site[3] = next((n for n in names if own(n)), "")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("early")
    ap.add_argument("late")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    early, late = (json.load(open(p)) for p in (args.early, args.late))
    a, b = sites(early, args.frames), sites(late, args.frames)
    rows = []
    for key in set(a) | set(b):
        ea, eb = a.get(key, [0, 0, 0, ""]), b.get(key, [0, 0, 0, ""])
        rows.append((eb[0] - ea[0], ea, eb, key))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"t-end: early {early['te'] / 1e6:.0f} s, late {late['te'] / 1e6:.0f} s after start")
    for delta, ea, eb, key in rows[:args.top]:
        if delta == 0:
            break
        print(f"\n{delta:+,} bytes: {ea[0]:,} in {ea[1]:,} blocks -> {eb[0]:,} in {eb[1]:,} "
              f"blocks (allocated in all: {ea[2]:,} -> {eb[2]:,})")
        for name in key:
            print(f"    {name}")
        own = eb[3] or ea[3]
        if own and own not in key:
            print(f"    ... {own}")
    for name, prof in (("early", a), ("late", b)):
        print(f"{name}: {sum(s[0] for s in prof.values()):,} bytes live in "
              f"{sum(s[1] for s in prof.values()):,} blocks, {len(prof):,} sites")


if __name__ == "__main__":
    main()
