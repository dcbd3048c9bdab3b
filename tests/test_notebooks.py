"""The notebooks: stored executed and fresh, and they still run.

``notebooks/make_notebooks.py`` (``make notebooks``) writes each notebook from its cell sources and
executes it in place, recording a hash of the code cells in the notebook's metadata. Here: the stored
notebooks are those cells, executed in order without an error, with the hash of the code they hold
(so their outputs come from this code); and each notebook is executed again by the same function the
command uses (every cell asserts what it shows, so a notebook that rots fails), in this interpreter's
environment, producing the same kinds of outputs cell by cell as the stored ones."""

import hashlib
import os
import sys

import nbformat
import pytest

pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb"))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import make_notebooks  # noqa: E402  (notebooks/ is not a package)


def _stored(name):
    return nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)


def _kinds(nb):
    """Per code cell, the kinds of output it holds (``stream:stdout``, ``image/png``, ...)."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kinds = set()
        for o in cell.outputs:
            if o.output_type == "stream":
                kinds.add(f"stream:{o.name}")
            else:
                kinds.update(k for k in o.get("data", {}) if k in ("image/png", "text/plain"))
        out.append(sorted(kinds))
    return out


def test_stored_notebooks_are_generated_executed_and_fresh():
    assert NOTEBOOKS == sorted(make_notebooks.NOTEBOOKS)
    for name, cells in make_notebooks.NOTEBOOKS.items():
        nb = _stored(name)
        assert [c.source for c in nb.cells] == [src for _, src in cells], f"regenerate {name}: make notebooks"
        code = [c for c in nb.cells if c.cell_type == "code"]
        # The hash of the stored code, computed here rather than by the generator's function.
        digest = hashlib.sha256(b"".join(c.source.encode() + b"\0" for c in code)).hexdigest()
        recorded = nb.metadata.get("alignjax", {}).get("code_sha256")
        assert recorded == digest, f"{name}: outputs are not from its current code; run make notebooks"
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: not run in order"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{name} stored an error"
        assert all(c.outputs for c in code if "print(" in c.source or "plt.show()" in c.source), name
        assert os.path.getsize(os.path.join(ROOT, "notebooks", name)) < 200_000, f"{name}: outputs too large"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    nb = make_notebooks.execute(name)
    setup = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    # nbclient's "python3" kernel is this interpreter's ipykernel: the same environment as the tests.
    assert f"kernel python: {os.path.relpath(sys.prefix, ROOT)}" in setup, setup
    assert nb.metadata["alignjax"] == _stored(name).metadata["alignjax"]
    assert _kinds(nb) == _kinds(_stored(name)), f"{name}: its cells now show other kinds of output"
