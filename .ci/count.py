#!/usr/bin/env python3
"""Counts meson test results: one line per log (its name), then the plain total line CI reads."""
import json
import sys
from pathlib import Path

total_pass = total_fail = 0
for path in sys.argv[1:]:
    results = [json.loads(line)["result"] for line in open(path)]
    passed = sum(r == "OK" for r in results)
    failed = len(results) - passed
    print(f"{Path(path).stem}: {passed} passed, {failed} failed")
    total_pass += passed
    total_fail += failed
print(f"{total_pass} passed, {total_fail} failed")
