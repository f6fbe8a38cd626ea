"""Check that a checkout's train_v2.py is what patches/ukd_train_v2.patch expects, before applying it.

    python patches/check_checkout.py /path/to/insightface            (or .../recognition/arcface_torch,
                                                                      or the train_v2.py file itself)

The anchors are read from the patch itself: every hunk's context lines must appear, consecutively and in
order, as `git apply` and `patch` need them. Exit status: 0 the patch fits; 1 an anchor is missing or moved
(the message names the file, the hunk and the anchor line); 2 no train_v2.py at that path or the patch is
unreadable; 3 the graft is already applied (undo it with `git apply -R`).
"""
import argparse
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATCH = os.path.join(HERE, "ukd_train_v2.patch")
TARGET = "recognition/arcface_torch/train_v2.py"
MARKER = "UKD graft"
OK, MISMATCH, NOT_FOUND, ALREADY_APPLIED = 0, 1, 2, 3


@dataclass
class Hunk:
    number: int
    old_start: int                                       # line number in the file the patch was made against
    context: List[str] = field(default_factory=list)     # preimage: the anchor lines, in order
    added: List[str] = field(default_factory=list)
    postimage: List[str] = field(default_factory=list)

    @property
    def purpose(self):
        """What the hunk adds, taken from the comment of its first added line."""
        first = self.added[0] if self.added else ""
        text = first.split("#", 1)[1] if "#" in first else first
        return text.replace(">>>", "").split(":", 1)[-1].strip()


def read_hunks(patch_path):
    """The hunks of a unified diff; raises ValueError on a removed line (the UKD patch only adds lines)."""
    with open(patch_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    hunks, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("@@ "):
            continue  # preamble text and the diff --git / --- / +++ / index headers
        old, new = line.split()[1:3]  # -start,count +start,count
        old_start, old_count = (int(x) for x in (old[1:] + ",1").split(",")[:2])
        new_count = int((new[1:] + ",1").split(",")[1])
        hunk = Hunk(number=len(hunks) + 1, old_start=old_start)
        hunks.append(hunk)
        while len(hunk.context) < old_count or len(hunk.postimage) < new_count:
            if i >= len(lines):
                raise ValueError(f"{patch_path}: hunk {hunk.number} is cut short")
            body, i = lines[i], i + 1
            if body.startswith("+"):
                hunk.added.append(body[1:])
                hunk.postimage.append(body[1:])
            elif body.startswith(" ") or body == "":
                hunk.context.append(body[1:])
                hunk.postimage.append(body[1:])
            elif body.startswith("\\"):
                continue
            else:
                raise ValueError(f"{patch_path}:{i}: hunk {hunk.number} has a line that is neither added nor "
                                 f"context: {body!r} (the UKD patch only adds lines)")
    if not hunks:
        raise ValueError(f"{patch_path}: no hunks found")
    return hunks


def find_block(lines, block, start=0):
    """Index of the first occurrence of `block` as consecutive lines of `lines` at or after `start`, else -1."""
    n = len(block)
    for i in range(start, len(lines) - n + 1):
        if lines[i:i + n] == block:
            return i
    return -1


def resolve_target(path):
    candidates = [path] if os.path.isfile(path) else [
        os.path.join(path, TARGET), os.path.join(path, "train_v2.py")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate, None
    return None, f"no train_v2.py found: tried {', '.join(candidates)}"


def diagnose(lines, hunk, start):
    """Why the hunk's anchor block is not at or after `start`: the first anchor line that is missing or moved."""
    stripped = [l.strip() for l in lines]
    for k, anchor in enumerate(hunk.context, 1):
        if anchor in lines[start:]:
            continue
        shown = repr(anchor)
        if anchor.strip() and anchor.strip() in stripped[start:]:
            return f"anchor line {k} of {len(hunk.context)} is there with other indentation or spacing: {shown}"
        if anchor in lines:
            return f"anchor line {k} of {len(hunk.context)} only appears before the previous hunk's anchors: {shown}"
        close = difflib.get_close_matches(anchor, lines[start:], n=1, cutoff=0.6)
        hint = f" (the closest line is {close[0]!r})" if close else ""
        return f"anchor line {k} of {len(hunk.context)} is missing: {shown}{hint}"
    return ("every anchor line exists, but not as one consecutive block (lines were added or removed between "
            "them): " + " / ".join(repr(a) for a in hunk.context if a.strip()))


def check(target, hunks):
    """(exit status, report lines)."""
    with open(target, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if any(MARKER in l for l in lines):
        applied = all(find_block(lines, h.postimage) >= 0 for h in hunks)
        how = "already applied" if applied else "partly applied or edited by hand"
        return ALREADY_APPLIED, [f"{target}: the UKD graft is {how} (lines mentioning '{MARKER}' are present); "
                                 "undo it with `git apply -R ukd_train_v2.patch` before applying again"]
    problems, position = [], 0
    for hunk in hunks:
        found = find_block(lines, hunk.context, position)
        if found < 0:
            problems.append(f"  hunk {hunk.number} (upstream line {hunk.old_start}; {hunk.purpose}): "
                            + diagnose(lines, hunk, position))
            continue
        position = found + len(hunk.context)
    if problems:
        return MISMATCH, ([f"{target} is not what ukd_train_v2.patch expects:"] + problems + [
            "The patch was made against insightface 7fadd420 (train_v2.py of ab27f4d6). Add the UKD lines by hand "
            "next to the equivalent lines of your train_v2.py (see patches/README.md, 'Applying by hand'), or try "
            "`git apply -3` if your checkout has upstream's history."])
    return OK, [f"{target}: all {sum(len(h.context) for h in hunks)} anchor lines of the {len(hunks)} hunks "
                "found in order; `git apply --check` should succeed"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="insightface checkout, its recognition/arcface_torch folder, or train_v2.py")
    parser.add_argument("--patch", default=DEFAULT_PATCH, help="the patch whose anchors are checked")
    args = parser.parse_args(argv)
    try:
        hunks = read_hunks(args.patch)
    except (OSError, ValueError) as exc:
        print(f"check_checkout: cannot read the patch: {exc}", file=sys.stderr)
        return NOT_FOUND
    target, error = resolve_target(args.checkout)
    if target is None:
        print(f"check_checkout: {error}", file=sys.stderr)
        return NOT_FOUND
    status, report = check(target, hunks)
    print("\n".join(report), file=sys.stdout if status == OK else sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
