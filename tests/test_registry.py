"""Handler discovery: which files and folders are functions, their entry points, versions and errors."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from eventfn.invoke import registry
from eventfn.invoke.registry import discover

HANDLER = "def handler(event, context):\n    return event\n"


def put(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def handlers_dir(tmp_path: Path) -> Path:
    path = tmp_path / "handlers"
    path.mkdir()
    return path


# -- what is a function ----------------------------------------------------------------------------------------


def test_file_defining_handler_is_a_function(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "hello.py", HANDLER)
    found = discover(handlers_dir)
    assert set(found) == {"hello"}
    source = found["hello"]
    assert source.name == "hello"
    assert source.module == "hello"
    assert source.attribute is None
    assert source.entry_file == str(entry.resolve())
    assert source.task_root == str(handlers_dir.resolve())
    assert source.error is None
    assert source.settings is not None and source.settings.timeout == 3.0


@pytest.mark.parametrize(
    "code",
    [
        "def lambda_handler(event, context):\n    return 1\n",
        "async def handler(event, context):\n    return 1\n",
        "def make():\n    return print\nhandler = make()\n",
        "from json import dumps as handler\n",
    ],
)
def test_other_ways_to_define_an_entry_point_make_a_function(handlers_dir: Path, code: str) -> None:
    put(handlers_dir, "fn.py", code)
    assert set(discover(handlers_dir)) == {"fn"}


def test_helper_module_without_entry_point_is_not_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", "import helpers\n" + HANDLER)
    put(handlers_dir, "helpers.py", "def shout(text):\n    return text.upper()\n")
    assert set(discover(handlers_dir)) == {"hello"}


def test_module_defining_handler_only_inside_a_function_is_not_a_function(handlers_dir: Path) -> None:
    put(
        handlers_dir,
        "factory.py",
        "def build():\n    def handler(event, context):\n        return 1\n    return handler\n",
    )
    assert discover(handlers_dir) == {}


def test_private_module_is_not_a_function_even_with_handler(handlers_dir: Path) -> None:
    put(handlers_dir, "_private.py", HANDLER)
    put(handlers_dir, "__init__.py", HANDLER)
    assert discover(handlers_dir) == {}


def test_file_with_invalid_function_name_is_not_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "bad name.py", HANDLER)
    put(handlers_dir, "bad.name.py", HANDLER)
    assert discover(handlers_dir) == {}


def test_file_with_syntax_error_is_a_function_so_its_error_can_be_shown(handlers_dir: Path) -> None:
    put(handlers_dir, "broken.py", "def handler(event, context)\n    return 1\n")
    found = discover(handlers_dir)
    assert set(found) == {"broken"}
    assert found["broken"].module == "broken"


def test_helper_with_inline_settings_block_is_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "configured.py", "# /// eventfn\n# timeout = 9\n# ///\nfrom helpers import run as main\n")
    found = discover(handlers_dir)
    assert set(found) == {"configured"}
    assert found["configured"].settings is not None and found["configured"].settings.timeout == 9


def test_helper_with_sidecar_settings_is_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "withsidecar.py", "def main(event, context):\n    return 1\n")
    put(handlers_dir, "withsidecar.toml", 'handler = "withsidecar.main"\nmemory = 512\n')
    found = discover(handlers_dir)
    assert set(found) == {"withsidecar"}
    source = found["withsidecar"]
    assert source.module == "withsidecar"
    assert source.attribute == "main"
    assert source.settings is not None and source.settings.memory == 512


def test_folder_with_lambda_function_py_is_a_function(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "orders/lambda_function.py", "def lambda_handler(event, context):\n    return 1\n")
    put(handlers_dir, "orders/util.py", "X = 1\n")
    found = discover(handlers_dir)
    assert set(found) == {"orders"}
    source = found["orders"]
    assert source.module == "lambda_function"
    assert source.attribute is None
    assert source.entry_file == str(entry.resolve())
    assert source.task_root == str((handlers_dir / "orders").resolve())
    assert source.error is None


@pytest.mark.parametrize("module", ["handler", "app", "main"])
def test_folder_with_other_default_entry_module_is_a_function(handlers_dir: Path, module: str) -> None:
    put(handlers_dir, f"svc/{module}.py", HANDLER)
    found = discover(handlers_dir)
    assert found["svc"].module == module
    assert found["svc"].error is None


def test_folder_with_eventfn_toml_names_a_nested_entry_point(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "billing/pkg/mod.py", "def fn(event, context):\n    return 1\n")
    put(handlers_dir, "billing/pkg/__init__.py", "")
    put(handlers_dir, "billing/eventfn.toml", 'handler = "pkg.mod.fn"\ntimeout = 12\n')
    found = discover(handlers_dir)
    assert set(found) == {"billing"}
    source = found["billing"]
    assert source.module == "pkg.mod"
    assert source.attribute == "fn"
    assert source.entry_file == str(entry.resolve())
    assert source.task_root == str((handlers_dir / "billing").resolve())
    assert source.settings is not None and source.settings.timeout == 12
    assert source.error is None


def test_folder_entry_module_named_in_eventfn_toml_has_its_inline_block_read(handlers_dir: Path) -> None:
    put(
        handlers_dir,
        "billing/pkg/mod.py",
        "# /// eventfn\n# memory = 1024\n# ///\ndef fn(event, context):\n    return 1\n",
    )
    put(handlers_dir, "billing/eventfn.toml", 'handler = "pkg.mod.fn"\n')
    source = discover(handlers_dir)["billing"]
    assert source.settings is not None and source.settings.memory == 1024


def test_folder_naming_a_missing_entry_module_carries_an_error(handlers_dir: Path) -> None:
    put(handlers_dir, "billing/eventfn.toml", 'handler = "nothere.fn"\n')
    source = discover(handlers_dir)["billing"]
    assert source.error is not None
    assert "nothere.py" in source.error


def test_folder_without_entry_module_or_settings_is_not_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "data/readme.txt", "just data\n")
    put(handlers_dir, "lib/tools.py", "X = 1\n")
    assert discover(handlers_dir) == {}


def test_private_or_hidden_folder_is_not_a_function(handlers_dir: Path) -> None:
    put(handlers_dir, "_shared/lambda_function.py", HANDLER)
    put(handlers_dir, ".hidden/lambda_function.py", HANDLER)
    assert discover(handlers_dir) == {}


def test_missing_handlers_directory_has_no_functions(tmp_path: Path) -> None:
    assert discover(tmp_path / "does-not-exist") == {}


def test_service_overrides_reach_the_settings(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", "# /// eventfn\n# timeout = 5\n# ///\n" + HANDLER)
    source = discover(handlers_dir, {"hello": {"timeout": 30}})["hello"]
    assert source.settings is not None and source.settings.timeout == 30


# -- broken settings are carried, not raised ---------------------------------------------------------------------


def test_broken_sidecar_yields_source_with_error(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", HANDLER)
    sidecar = put(handlers_dir, "hello.toml", "timeout = = 3\n")
    put(handlers_dir, "fine.py", HANDLER)
    found = discover(handlers_dir)
    assert set(found) == {"hello", "fine"}
    broken = found["hello"]
    assert broken.settings is None
    assert broken.error is not None and "invalid TOML" in broken.error
    assert broken.error_file == f"{sidecar.resolve()}:1"
    assert found["fine"].error is None


def test_broken_inline_block_yields_source_with_error_at_handler_line(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "hello.py", "import os\n# /// eventfn\n# timeout = 3\n# memory = [\n# ///\n" + HANDLER)
    source = discover(handlers_dir)["hello"]
    assert source.settings is None
    assert source.error is not None
    assert source.error_file is not None and source.error_file.startswith(str(entry.resolve()))


def test_unknown_setting_yields_source_with_error_naming_key(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", HANDLER)
    put(handlers_dir, "hello.toml", "timout = 3\n")
    source = discover(handlers_dir)["hello"]
    assert source.settings is None
    assert source.error is not None and "timout" in source.error


def test_broken_folder_settings_yield_source_with_error(handlers_dir: Path) -> None:
    put(handlers_dir, "orders/lambda_function.py", HANDLER)
    put(handlers_dir, "orders/eventfn.toml", 'triggers = ["eventfn.>"]\n')
    source = discover(handlers_dir)["orders"]
    assert source.settings is None
    assert source.error is not None and "eventfn.>" in source.error


# -- versions ------------------------------------------------------------------------------------------------


def test_version_is_stable_without_changes(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "hello.py", HANDLER)
    put(handlers_dir, "orders/lambda_function.py", HANDLER)
    first = discover(handlers_dir)
    os.utime(entry, (1_000_000, 1_000_000))  # a touch is not a change
    second = discover(handlers_dir)
    assert {n: s.version for n, s in first.items()} == {n: s.version for n, s in second.items()}


def test_version_changes_when_code_changes(handlers_dir: Path) -> None:
    entry = put(handlers_dir, "hello.py", HANDLER)
    before = discover(handlers_dir)["hello"].version
    entry.write_text(HANDLER.replace("return event", "return 2"), encoding="utf-8")
    assert discover(handlers_dir)["hello"].version != before


def test_version_changes_when_sidecar_settings_change(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", HANDLER)
    sidecar = put(handlers_dir, "hello.toml", "timeout = 3\n")
    before = discover(handlers_dir)["hello"].version
    sidecar.write_text("timeout = 4\n", encoding="utf-8")
    assert discover(handlers_dir)["hello"].version != before


def test_version_changes_when_service_overrides_change(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", HANDLER)
    before = discover(handlers_dir, {"hello": {"timeout": 3}})["hello"].version
    assert discover(handlers_dir, {"hello": {"timeout": 3}})["hello"].version == before
    assert discover(handlers_dir, {"hello": {"timeout": 4}})["hello"].version != before


def test_version_changes_when_shared_helper_changes(handlers_dir: Path) -> None:
    put(handlers_dir, "hello.py", "import helpers\n" + HANDLER)
    helper = put(handlers_dir, "helpers.py", "X = 1\n")
    before = discover(handlers_dir)["hello"].version
    helper.write_text("X = 2\n", encoding="utf-8")
    assert discover(handlers_dir)["hello"].version != before


def test_folder_version_changes_when_any_file_in_it_changes(handlers_dir: Path) -> None:
    put(handlers_dir, "orders/lambda_function.py", HANDLER)
    util = put(handlers_dir, "orders/lib/util.py", "X = 1\n")
    before = discover(handlers_dir)["orders"].version
    util.write_text("X = 2\n", encoding="utf-8")
    assert discover(handlers_dir)["orders"].version != before


def test_folder_version_changes_when_its_eventfn_toml_changes(handlers_dir: Path) -> None:
    put(handlers_dir, "orders/lambda_function.py", HANDLER)
    sidecar = put(handlers_dir, "orders/eventfn.toml", "memory = 256\n")
    before = discover(handlers_dir)["orders"].version
    sidecar.write_text("memory = 512\n", encoding="utf-8")
    assert discover(handlers_dir)["orders"].version != before


def test_folder_version_ignores_other_functions_and_bytecode(handlers_dir: Path) -> None:
    put(handlers_dir, "orders/lambda_function.py", HANDLER)
    other = put(handlers_dir, "payments/lambda_function.py", HANDLER)
    before = discover(handlers_dir)["orders"].version
    other.write_text(HANDLER.replace("event\n", "None\n"), encoding="utf-8")
    put(handlers_dir, "orders/__pycache__/lambda_function.cpython-311.pyc", "compiled")
    assert discover(handlers_dir)["orders"].version == before


def test_different_functions_with_same_code_have_different_versions(handlers_dir: Path) -> None:
    put(handlers_dir, "a.py", HANDLER)
    put(handlers_dir, "b.py", HANDLER)
    found = discover(handlers_dir)
    assert found["a"].version != found["b"].version


def test_the_entry_name_is_the_one_the_module_defines() -> None:
    # Lambda's `Handler` (GetFunction, `_HANDLER`) names what runs: `handler` first, as the runtime's loader takes it.
    assert registry.entry_name("def lambda_handler(event, context):\n    pass\n") == "lambda_handler"
    assert registry.entry_name("def handler(e, c): ...\ndef lambda_handler(e, c): ...\n") == "handler"
    assert registry.entry_name("from app import lambda_handler\n") == "lambda_handler"
    assert registry.entry_name("x = (\n") == "handler"  # does not parse: the default, the loader says why


# -- reading each file once ------------------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    """Date the file back, as a handler written long ago is (its ctime stays now: the change is its own)."""
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def test_a_file_rewritten_at_once_with_the_same_size_is_a_new_version(handlers_dir: Path) -> None:
    put(handlers_dir, "fn.py", "def handler(event, context):\n    return 1\n")
    first = discover(handlers_dir)["fn"].version
    put(handlers_dir, "fn.py", "def handler(event, context):\n    return 2\n")  # same size, same mtime tick maybe
    assert discover(handlers_dir)["fn"].version != first


def test_a_settled_file_changed_with_its_size_and_mtime_kept_is_a_new_version(handlers_dir: Path) -> None:
    path = put(handlers_dir, "fn.py", "def handler(event, context):\n    return 1\n")
    _age(path, 3600)
    first = discover(handlers_dir)["fn"]
    assert discover(handlers_dir)["fn"] == first  # settled and unchanged: the same source
    mtime = path.stat().st_mtime_ns
    path.write_text("def handler(event, context):\n    return 2\n", encoding="utf-8")
    os.utime(path, ns=(mtime, mtime))  # what a copy keeping timestamps does: only the ctime tells
    changed = discover(handlers_dir)["fn"]
    assert changed.version != first.version


def test_a_changed_helper_makes_new_versions_of_settled_functions(handlers_dir: Path) -> None:
    helper = put(handlers_dir, "shared.py", "VALUE = 1\n")
    fn = put(handlers_dir, "fn.py", "import shared\ndef handler(event, context):\n    return shared.VALUE\n")
    _age(helper, 3600)
    _age(fn, 3600)
    first = discover(handlers_dir)["fn"].version
    assert discover(handlers_dir)["fn"].version == first
    put(handlers_dir, "shared.py", "VALUE = 2\n")
    assert discover(handlers_dir)["fn"].version != first


def test_the_handler_named_follows_the_entry_file(handlers_dir: Path) -> None:
    path = put(handlers_dir, "fn.py", "def handler(event, context):\n    return 1\n")
    _age(path, 3600)
    assert discover(handlers_dir)["fn"].handler() == "fn.handler"
    put(handlers_dir, "fn.py", "def lambda_handler(event, context):\n    return 1\n")
    assert discover(handlers_dir)["fn"].handler() == "fn.lambda_handler"
