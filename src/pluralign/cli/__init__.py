"""The ``pluralign`` command line (typer + rich): thin commands over library functions.

* :mod:`~pluralign.cli.app` — the typer app, the options every command shares, CONFIG
  arguments and error exits;
* :mod:`~pluralign.cli.output` — the consoles and the one renderer of every command's end:
  tables, claims and messages, or one JSON document (``--json``);
* :mod:`~pluralign.cli.experiments` — ``run`` (over :mod:`pluralign.experiments`);
* :mod:`~pluralign.cli.report` — ``report`` of any command's output folder;
* :mod:`~pluralign.cli.personalize` — ``data validate``, ``example-data``, ``fit``, ``rank``
  (over :mod:`pluralign.personalize`);
* :mod:`~pluralign.cli.llm` — ``train-rm``, ``train-policy``, ``iterate``, ``generate``
  (over :mod:`pluralign.llm`).

The commands are registered here, in the order ``pluralign --help`` lists them.
"""

from pluralign.cli.app import app, data_app
from pluralign.cli.experiments import run
from pluralign.cli.llm import generate, iterate_command, train_policy_command, train_rm
from pluralign.cli.personalize import data_validate, example_data, fit, rank
from pluralign.cli.report import report

__all__ = ["app"]

app.command()(run)
app.command()(report)
app.add_typer(data_app, name="data")
data_app.command("validate")(data_validate)
app.command("example-data")(example_data)
app.command()(fit)
app.command()(rank)
app.command("train-rm")(train_rm)
app.command("train-policy")(train_policy_command)
app.command("iterate")(iterate_command)
app.command()(generate)
