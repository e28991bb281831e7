"""``python -m fastenc.bench render RESULTS.json [--readme README.md]``: rewrite the .md and .png of a
results JSON (e.g. one measured where matplotlib was missing)."""

import argparse
import sys
from pathlib import Path

from .report import render

parser = argparse.ArgumentParser(prog="python -m fastenc.bench",
                                 description="rewrite the .md and .png of a fastenc bench results JSON")
parser.add_argument("action", choices=("render",))
parser.add_argument("json", type=Path)
parser.add_argument("--readme", type=Path)
arguments = parser.parse_args()
for written in render(arguments.json, arguments.readme).values():
    print(f"wrote {written}", file=sys.stderr)
