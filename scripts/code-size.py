#!/usr/bin/env python3
"""Report source files over 800 lines and functions over 120 lines under src/
(unit-test modules, `#[cfg(test)]` to the end of the file, excluded).
Exit status 1 when any is found. A rough reader: it follows braces from a
line that starts a `fn`, which is enough for rustfmt-formatted code."""
import re
import sys
from pathlib import Path

FILE_MAX, FN_MAX = 800, 120
bad = 0
fn_re = re.compile(r"^\s*(pub(\([a-z:]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
for path in sorted(Path("src").rglob("*.rs")):
    lines = path.read_text().split("\n")
    cut = next((i for i, l in enumerate(lines) if l.strip() == "#[cfg(test)]"), len(lines))
    lines = lines[:cut]
    if len(lines) > FILE_MAX:
        print(f"{path}: {len(lines)} lines (file)")
        bad += 1
    i = 0
    while i < len(lines):
        m = fn_re.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = re.sub(r'"([^"\\]|\\.)*"', '""', lines[j].split("//")[0])
            depth += code.count("{") - code.count("}")
            started = started or "{" in code
            if started and depth <= 0:
                break
            if not started and code.rstrip().endswith(";"):
                break
            j += 1
        n = j - i + 1
        if started and n > FN_MAX:
            print(f"{path}:{i + 1}: fn {m.group(6)} {n} lines")
            bad += 1
        i = j + 1 if started else i + 1
print(f"{bad} over the limits (files > {FILE_MAX}, functions > {FN_MAX} lines)")
sys.exit(1 if bad else 0)
