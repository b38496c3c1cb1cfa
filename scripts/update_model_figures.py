"""Recount the parameters and MACs that ``hybridvit models`` lists (src/hybridvit/cli/model_figures.json).

Run after adding a variant or changing what a model computes; tests/test_cli.py checks the file
against a fresh count.
"""

from __future__ import annotations

import json

from hybridvit.cli.models import FIGURES_FILE, count_figures, figures_key
from hybridvit.registry import list_models

figures = {name: {"key": figures_key(name), **count_figures(name)} for name in list_models()}
FIGURES_FILE.write_text("{\n" + ",\n".join(f"{json.dumps(n)}: {json.dumps(f)}" for n, f in figures.items()) + "\n}\n")
print(f"wrote {FIGURES_FILE} ({len(figures)} models)")
