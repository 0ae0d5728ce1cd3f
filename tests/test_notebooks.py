"""Every notebook in ``notebooks/`` runs top to bottom in a fresh kernel.

The notebooks carry their own behavioural checks (``mge_walkthrough``
asserts that the telescoping sum on equal samples is the fine gradient), so
a cell that raises fails the test. The kernel inherits this process's
environment, hence ``tests/conftest.py``'s ``XLA_FLAGS`` and
``MGTRAIN_NOTEBOOK_QUICK=1``, under which the training loops take fewer steps.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _outputs(nb, output_type):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if o.get("output_type") == output_type]


def _stored_stream_text(name):
  """Everything the stored notebook ``name`` printed, as one string."""
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  return "".join(o.get("text", "") for o in _outputs(nb, "stream"))


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  # The notebooks' training loops take fewer steps under this variable (the
  # same code, every cell and check); the stored outputs are full runs.
  monkeypatch.setenv("MGTRAIN_NOTEBOOK_QUICK", "1")
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()   # raises CellExecutionError on any failing cell
  assert not _outputs(nb, "error")
  # Every plt.show() produced a figure, and every code cell ran.
  figures = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
  assert len(figures) == sum("plt.show()" in c.source for c in nb.cells if c.cell_type == "code")
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_walkthrough_prints_the_papers_work_units():
  """The stored walkthrough shows Table 2's #WU, which mgtrain.workunits gives."""
  from mgtrain import workunits

  text = _stored_stream_text("mge_walkthrough.ipynb")
  expected = (f"single-scale {workunits.single_scale_closed_form(16, 2000)} | multiscale "
              f"{workunits.multiscale_closed_form(16, 2000)} | full-multiscale "
              f"{workunits.full_multiscale_closed_form(16, 2000)}")
  assert expected in text
  assert "single-scale 480000 | multiscale 74000 | full-multiscale 28750" in text


def test_full_multiscale_notebook_prints_eq_47():
  """The stored Full-Multiscale notebook's schedule costs what Eq. (47) says."""
  from mgtrain import workunits

  text = _stored_stream_text("full_multiscale.ipynb")
  closed = float(workunits.full_multiscale_closed_form(16, 2000))
  assert f"total {closed:,.0f} #WU; Eq. (47): 115/128 N0 I = {closed:,.0f}" in text
  assert "total 28,750 #WU" in text
