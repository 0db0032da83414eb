"""``python -m pluralign.cli``: the ``pluralign`` command."""

from pluralign.cli import app

app()
