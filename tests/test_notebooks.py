"""The results notebook runs top to bottom on the committed table rows (the PV notebook is run in test_pv_tuning)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_results_notebook_shows_the_committed_table(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    results = REPO / "results" / "smollm2-135m"
    rows = sorted(path.stem for path in (results / "rows").glob("*.json"))
    assert rows, f"no committed rows under {results}/rows"
    monkeypatch.setenv("AQLM_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert f"{len(rows)} rows from" in printed
    table = [line.split()[0] for line in printed.splitlines() if line.split() and line.split()[0] in rows]
    assert sorted(table) == rows
