"""Executes notebooks/*.ipynb with nbclient (kernel ``python3``): every cell asserts what it shows,
so a notebook that rots fails here. Also checks that the committed notebooks carry no outputs and
match their generator, and that the kernel runs this interpreter's environment."""

import os
import sys

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb"))


def test_notebooks_are_generated_and_clean():
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import make_notebooks

    assert NOTEBOOKS == sorted(make_notebooks.NOTEBOOKS)
    for name, cells in make_notebooks.NOTEBOOKS.items():
        nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        assert [c.source for c in nb.cells] == [src for _, src in cells], f"regenerate {name}"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} has outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=150,
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    setup = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    # nbclient's "python3" kernel is this interpreter's ipykernel: the same environment as the tests.
    assert f"kernel python: {sys.prefix}" in setup, setup
