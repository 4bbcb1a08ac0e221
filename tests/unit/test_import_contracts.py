"""The house rules on imports (DESIGN.md, Layout), as import-linter contracts in pyproject.toml.

inner and outer never import each other; models never import coding; coding and wire do no
I/O; config is a leaf; redteam is imported by nothing that serves; the relay never imports inner
(it holds no strong model), and neither side imports the relay.
"""

import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_every_import_contract_is_kept(capsys) -> None:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out
