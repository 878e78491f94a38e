"""The command line: every command has help, and bad input gives one error line, exit code 2, no
traceback, and leaves nothing half-made behind."""

import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ragrpo.cli import main


def ragrpo(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ragrpo.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in (command.help or ""), f"{name} has no example in its help"


def test_help_is_instant_without_heavy_imports():
    code = "import sys, ragrpo.cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'lancedb', 'trl')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_index_missing_file_leaves_no_database(tmp_path):
    result = ragrpo("index", tmp_path / "missing.csv", "--table", "t", "--db", tmp_path / "db")
    assert_user_error(result, "missing.csv", "does not exist")
    assert not (tmp_path / "db").exists()


def test_index_missing_text_column(tmp_path):
    result = ragrpo("index", "builtin:movies", "--table", "t", "--db", tmp_path / "db", "--text-column", "summary")
    assert_user_error(result, "no column 'summary'", "movie_plot")
    assert not (tmp_path / "db").exists()


def test_index_bad_rename(tmp_path):
    result = ragrpo("index", "builtin:movies", "--table", "t", "--db", tmp_path / "db", "--rename", "Year=year")
    assert_user_error(result, "no column 'Year'")


def test_index_empty_dataset(tmp_path):
    (tmp_path / "empty.csv").write_text("title,text\n")
    result = ragrpo("index", tmp_path / "empty.csv", "--table", "t", "--db", tmp_path / "db")
    assert_user_error(result, "has no rows")
    assert not (tmp_path / "db").exists()


def test_search_unknown_table(tmp_path):
    assert_user_error(ragrpo("search", "q", "--table", "nope", "--db", tmp_path), "no table 'nope'")


def test_train_unknown_reward_leaves_no_output(tmp_path):
    result = ragrpo("train", "--reward", "brevity", "--output", tmp_path / "run")
    assert_user_error(result, "unknown reward 'brevity'", "length, token_diversity")
    assert not (tmp_path / "run").exists()


def test_train_unreadable_config(tmp_path):
    (tmp_path / "run.toml").write_text("[grpo\n")
    assert_user_error(ragrpo("train", "--config", tmp_path / "run.toml", "--output", tmp_path / "run"),
                      "not valid TOML")
    (tmp_path / "run.toml").write_text("[grpo]\nmax_stepz = 3\n")
    assert_user_error(ragrpo("train", "--config", tmp_path / "run.toml", "--output", tmp_path / "run"),
                      "unknown GRPO setting 'max_stepz'")
    assert not (tmp_path / "run").exists()


def test_train_unknown_model(tmp_path):
    assert_user_error(ragrpo("train", "--model", tmp_path / "no-such-model", "--output", tmp_path / "run"),
                      "no-such-model", "not found")
    assert not (tmp_path / "run").exists()


def test_train_unreachable_hub_model(tmp_path):
    # HF_HUB_OFFLINE=1 here: a Hub id takes the same from_pretrained path, and fails with one line.
    assert_user_error(ragrpo("train", "--model", "no-such-org/no-such-model", "--output", tmp_path / "run"),
                      "'no-such-org/no-such-model' could not be loaded")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_train_bad_datasets_leave_no_output(tmp_path, base_model_dir):
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(ragrpo("train", "--dataset", tmp_path / "empty.jsonl", "--output", tmp_path / "run"), "empty")
    (tmp_path / "noprompt.csv").write_text("question\nwhy?\n")
    assert_user_error(ragrpo("train", "--dataset", tmp_path / "noprompt.csv", "--output", tmp_path / "run"),
                      "no column 'prompt'")
    assert_user_error(ragrpo("train", "--prompt-template", "Summarize {synopsis}", "--output", tmp_path / "run"),
                      "no column 'synopsis'")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_search_malformed_filters(movie_db):
    assert_user_error(ragrpo("search", "q", "--table", "movies", "--db", movie_db, "--where", "release_yr < 1990"),
                      "invalid --where", "release_yr")
    assert_user_error(ragrpo("search", "q", "--table", "movies", "--db", movie_db, "--where", "release_year <<< 1"),
                      "invalid --where")


def test_serve_bad_options_fail_before_loading(tmp_path):
    assert_user_error(ragrpo("serve", "--table", "nope", "--db", tmp_path), "no table 'nope'")
    assert_user_error(ragrpo("serve", "--table", "t", "--db", tmp_path, "--port", "70000"), "--port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(ragrpo("serve", "--table", "t", "--db", tmp_path, "--port", port), "cannot listen on",
                          str(port))
    for flag in ("--max-batch", "--prefill-chunk"):
        assert_user_error(ragrpo("serve", "--table", "t", "--db", tmp_path, flag, "0"), f"{flag} must be at least 1")


def _package_imports() -> dict[str, set[str]]:
    """Each ragrpo module (dotted name) -> the ragrpo modules it imports, at the top or inside a function."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "src" / "ragrpo"
    files = {".".join(("ragrpo",) + p.relative_to(package).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in files:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in files}
        graph[name] = found - {name, "ragrpo"}  # the top package holds only RagrpoError and cache_dir
    return graph


def test_no_module_reaches_itself_through_its_imports_and_none_is_over_600_lines():
    from pathlib import Path

    graph = _package_imports()

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and (seen.add(nxt) or reaches(nxt, target, seen))):
                return True
        return False

    assert [name for name in graph if reaches(name, name, set())] == []
    assert graph["ragrpo.generation.rag"] and graph["ragrpo.rewards.citations"]  # the walk does see imports
    package = Path(__file__).resolve().parent.parent / "src" / "ragrpo"
    long = {str(p.relative_to(package)): n for p in package.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_the_readme_map_names_every_module():
    """The README's "Where things are" is the tree: every module under src/ragrpo, in its folder."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    section = (root / "README.md").read_text().split("## Where things are", 1)[1].split("```")[1]
    listed, folder = set(), ""
    for line in section.splitlines():
        found = re.match(r"^(\s*)(\S+)", line)
        if not found or found.group(2).startswith(("src/", "tests/", "bench/")):
            continue
        depth, name = len(found.group(1)), found.group(2)
        if name.endswith("/"):
            folder = name if depth <= 2 else folder
        elif name.endswith(".py"):
            listed.add(f"{folder}{name}" if depth > 2 else name)
    package = root / "src" / "ragrpo"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if not (p.name == "__init__.py" and p.parent != package)}
    assert listed == modules
