"""Every shell command block of README.md and docs/*.md runs as written, outside a checkout.

A *shell block* is a fenced block whose info string starts with ``bash``, ``sh``, ``shell`` or
``console``. Each one runs as one ``bash`` script (``set -euo pipefail``: every command must
succeed) in its own fresh, empty temporary working directory, with the folder of this Python's
console scripts (``.venv/bin``, where ``pluralign`` is) first on PATH, ``OMP_NUM_THREADS=1``,
``MPLBACKEND=Agg`` and one text-embedding cache (``PLURALIGN_CACHE``) shared by the blocks of
the session, as a user's would be.

**The marker.** A block is not run when the line right before its opening fence is one of
the HTML comments (invisible on GitHub)::

    <!-- long: REASON -->      more than ~20 s, or needs a package that is not a test dependency
                               (full sweeps, SmolLM2 runs, MiniLM reward models)
    <!-- not run: REASON -->   needs what a user's empty folder does not have (the checkout's
                               Makefile and tests/, GPUs)

REASON is required. Python blocks (```python) are not run here: they are API examples, and
the API has its own tests. A fenced block without an info string must not hold commands (so
that no command block escapes this test unnoticed): label it ``bash`` or ``text`` (a usage
synopsis). A block that is run must not hold placeholders (``CONFIG.yaml``, ``<NAME>``).

The other tests at the bottom check the config resolver of the CLI (packaged configs by name,
``package:`` data paths) and ``pluralign example-data``, in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pluralign._packaged import (
    packaged_config_names,
    packaged_configs_dir,
    resolve_package_paths,
)
from pluralign.cli import app
from pluralign.cli.app import load_command_config, resolve_config_path
from pluralign.cli.personalize import EXAMPLE_FILES
from pluralign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>long|not run)\s*:\s*(?P<reason>.*?)\s*-->\s*$")
PLACEHOLDER = re.compile(r"CONFIG\.yaml|<[A-Za-z_][A-Za-z0-9_ -]*>")
COMMAND = re.compile(r"^\s*(\$\s+)?(pluralign|make|python|pip|accelerate|cd)\b")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str
    marker: str | None  # the line before the fence, when it is a marker comment

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    @property
    def language(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (indented ones in lists too)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or "`" in m["info"]:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence))
            and not lines[j].strip().strip(fence[0])
        ):
            j += 1
        body = [
            line[indent:] if line[:indent].isspace() else line.lstrip() for line in lines[i + 1 : j]
        ]
        before = lines[i - 1] if i else ""
        found.append(
            Block(
                path,
                i + 1,
                m["info"].strip(),
                "\n".join(body) + "\n",
                before if MARKER.match(before) else None,
            )
        )
        i = j + 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]
SHELL = [b for b in ALL if b.language in SHELLS]
RUN = [b for b in SHELL if b.marker is None]


def test_the_docs_have_shell_blocks_and_markers_have_reasons():
    assert len(SHELL) >= 8 and len(RUN) >= 2, [b.name for b in SHELL]
    for block in ALL:
        if block.marker is not None:
            match = MARKER.match(block.marker)
            assert match and match["reason"], f"{block.name}: a marker needs a reason"
            assert block.language in SHELLS, f"{block.name}: a marker on a non-shell block"
        if not block.info:
            first = next((line for line in block.text.splitlines() if line.strip()), "")
            assert not COMMAND.match(first), (
                f"{block.name}: a block of commands without an info string; label it bash "
                "(it is then run by this test) or text (a synopsis)"
            )
    for block in RUN:
        found = PLACEHOLDER.search(block.text)
        assert found is None, f"{block.name}: placeholder {found[0]!r} in a block that is run"


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_block_runs_in_an_empty_folder(block: Block, tmp_path: Path, embedding_cache: Path):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "pluralign").is_file(), (
        f"no pluralign console script in {bin_dir}: install the package (pip install -e .)"
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PLURALIGN_CACHE": str(embedding_cache),
    }
    script = "set -euo pipefail\n" + block.text
    start = time.perf_counter()
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.name} ran past {BLOCK_TIMEOUT_S} s; mark it <!-- long: ... -->")
    took = time.perf_counter() - start
    assert done.returncode == 0, (
        f"{block.name} failed (exit {done.returncode}) in {took:.0f} s:\n{block.text}\n"
        f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-3000:]}"
    )


# ----------------------------------------------------------------- the resolver, in process
def test_packaged_configs_resolve_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = packaged_config_names()
    assert {"loco", "quick", "rm_personas", "policy_toy", "iterate_toy"} <= set(names)
    expected = packaged_configs_dir() / "loco.yaml"
    for given in ("loco", "loco.yaml", "configs/loco.yaml", "configs/loco"):
        assert resolve_config_path(Path(given)) == expected
    assert "using packaged config loco" in capsys.readouterr().err
    # an existing file wins over the packaged config of that name
    (tmp_path / "loco.yaml").write_text("experiment: loco\n")
    assert resolve_config_path(Path("loco.yaml")) == Path("loco.yaml")
    for bad in ("nope", "other/loco.yaml", "loco.yml.yaml", "../loco"):
        with pytest.raises(ConfigError, match=r"packaged configs: .*rm_personas"):
            resolve_config_path(Path(bad))


def test_packaged_configs_need_no_checkout_files(tmp_path, monkeypatch):
    """Every file a packaged config names is shipped with it (package:PATH); after
    resolution every path is absolute and exists, from any working directory."""
    monkeypatch.chdir(tmp_path)
    for name in packaged_config_names():
        _, raw = load_command_config(Path(name), announce=False)

        def strings(value):
            if isinstance(value, dict):
                for v in value.values():
                    yield from strings(v)
            elif isinstance(value, list):
                for v in value:
                    yield from strings(v)
            elif isinstance(value, str):
                yield value

        for text in strings(raw):
            assert "tests/fixtures" not in text and not text.startswith("package:"), (name, text)
            if text.endswith((".jsonl", ".json", ".parquet", ".npz", ".csv")):
                assert Path(text).is_absolute() and Path(text).is_file(), (name, text)
    _, raw = load_command_config(
        Path("rm_personas"), ["data.eval=package:data/personas.jsonl"], announce=False
    )
    assert raw["data"]["eval"] == raw["data"]["train"]
    assert (
        Path(raw["data"]["train"]).read_bytes()
        == (ROOT / "tests" / "fixtures" / "personas.jsonl").read_bytes()
    )


@pytest.mark.parametrize(
    "value",
    [
        "package:data/missing.jsonl",
        "package:",
        "package:data",
        "package:../cli/__init__.py",
        "package:/etc/hostname",
    ],
)
def test_bad_package_paths_are_config_errors(value):
    with pytest.raises(
        ConfigError,
        match=r"data\.train: .*is not a packaged file.*"
        r"package:data/personas\.jsonl",
    ):
        resolve_package_paths({"data": {"train": value}})


def test_commands_name_the_packaged_configs_on_a_bad_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("run", "train-rm", "train-policy", "iterate"):
        result = CliRunner().invoke(app, [command, "no_such_config"])
        assert result.exit_code == 2, (command, result.output)
        assert "packaged configs:" in result.output and "iterate_toy" in result.output


def test_example_data_writes_files_fit_and_rank_accept(tmp_path, monkeypatch):
    from pluralign.data.loaders import read_trl

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["example-data", "ex"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == sorted(EXAMPLE_FILES)
    prefs = read_trl(tmp_path / "ex" / "prefs.jsonl")
    assert prefs.n == 240 and len(set(prefs.users.tolist())) == 6
    for line in (tmp_path / "ex" / "candidates.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert isinstance(row["prompt"], str) and len(row["responses"]) >= 3
    for line in (tmp_path / "ex" / "prompts.jsonl").read_text().splitlines():
        assert json.loads(line)["user_id"] in ("vowels", "digits")
    # the same files again: fine; a changed file is not overwritten without --force
    assert CliRunner().invoke(app, ["example-data", "ex"]).exit_code == 0
    (tmp_path / "ex" / "prefs.jsonl").write_text("mine\n")
    result = CliRunner().invoke(app, ["example-data", "ex"])
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "ex" / "prefs.jsonl").read_text() == "mine\n"
    assert CliRunner().invoke(app, ["example-data", "ex", "--force"]).exit_code == 0
    assert (tmp_path / "ex" / "prefs.jsonl").stat().st_size > 100_000
    (tmp_path / "file").write_text("")
    assert CliRunner().invoke(app, ["example-data", "file"]).exit_code == 2
