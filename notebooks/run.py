"""Executes notebooks without Jupyter: every code cell in order, in one namespace, from the
notebook's folder (so relative paths behave as in Jupyter). Fails on the first error.

    python notebooks/run.py notebooks/*.ipynb
"""
import json
import os
import sys
from pathlib import Path

for nb_path in sys.argv[1:]:
    nb_path = Path(nb_path).resolve()
    cells = json.loads(nb_path.read_text())["cells"]
    os.chdir(nb_path.parent)
    env = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        try:
            exec(compile(src, f"{nb_path.name}[cell {i}]", "exec"), env)
        except Exception:
            print(f"{nb_path.name}: cell {i} failed", file=sys.stderr)
            raise
    print(f"{nb_path.name}: {sum(c['cell_type'] == 'code' for c in cells)} code cells ran")
