"""Small-scale reproductions of paper claims (tables in docs/reproductions.md).

Each module ``alignjax.repro.<name>`` runs one reproduction from one command,

    python -m alignjax.repro.<name> --config=experiments/repro_<name>.py[:arg] --workdir=DIR

writes ``DIR/table.json`` (rows, per-seed values, mean and spread) and ``DIR/table.md``, and prints the
Markdown table that docs/reproductions.md carries. :mod:`alignjax.repro.common` holds the shared pieces
(the quickstart-sized SFT -> preference pipeline on the arithmetic task, per-pair log-probs, tables).
:mod:`alignjax.repro.params` declares each reproduction's own parameters (``config.repro``) with
their defaults.
"""
