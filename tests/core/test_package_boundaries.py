"""The arrows point one way, ``web -> core <- worker``: no module of ``core`` imports ``web`` or
``worker``, and the broker module loads without Celery. The import checks run in a fresh
interpreter, so what an earlier test imported cannot hide an import; a reading of the source
catches the imports inside functions, which only run when the function does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL_OF_CORE = """
import importlib, json, pkgutil, sys
import core

names = [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def run_python(code: str) -> dict[str, list[str]]:
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def top_level(modules: list[str], *packages: str) -> list[str]:
    return [m for m in modules if m.split(".")[0] in packages]


def test_no_module_of_core_imports_web_or_worker() -> None:
    got = run_python(IMPORT_ALL_OF_CORE)
    assert {"core.queue.broker", "core.upkeep.reaper", "core.cli", "core.queue.dispatch"} <= set(
        got["modules"]
    )
    assert top_level(got["loaded"], "web", "worker") == []


def test_the_broker_module_and_the_cli_load_without_celery() -> None:
    got = run_python(
        "import json, sys\nimport core.queue.broker, core.upkeep.reaper, core.cli\n"
        'print(json.dumps({"loaded": sorted(sys.modules)}))'
    )
    assert top_level(got["loaded"], "celery", "kombu", "flask") == []


def test_no_function_of_core_imports_web_or_worker_either() -> None:
    found = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("web", "worker"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert found == []
