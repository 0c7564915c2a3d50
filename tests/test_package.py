"""The shape of the package: no import cycle, no module reaching into another's private names, and a package that
works installed without the repository around it (its schema and reward workers travel with it)."""

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
REPO = SRC.parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the drpo package."""
    modules = {}
    for path in (SRC / "drpo").rglob("*.py"):
        if "workers" in path.relative_to(SRC).parts:  # scripts run by other environments' pythons
            continue
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported drpo module, names taken from it) for every import of the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("drpo")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drpo"):
            for alias in node.names:  # `from drpo.x import y` imports the module drpo.x.y when there is one
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, []) if submodule in modules else (node.module, [alias.name]))
    return found


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: {target for target, _ in _imports(path, modules) if target in modules and target != name}
             for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert cycles == [], f"import cycles through these edges: {cycles}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = [f"{name} takes {imported}.{item}" for name, path in modules.items()
                 for imported, items in _imports(path, modules) for item in items
                 if item.startswith("_") and imported != name]
    assert offenders == []


def test_the_installed_package_finds_its_schema_and_reward_workers(tmp_path):
    """Build the wheel from a copy of the package's files, install it into a bare folder, use it from elsewhere."""
    source = tmp_path / "source"
    shutil.copytree(SRC, source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, cwd=tmp_path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    *map(str, wheels.glob("drpo-*.whl"))], check=True, capture_output=True, cwd=tmp_path)
    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import torch, yaml
        import drpo
        from drpo.config import load_config
        from drpo.rewards import build_reward_from_config
        from drpo.rewards.worker import WORKERS_DIR
        assert drpo.__file__.startswith({str(target)!r}), drpo.__file__
        config = load_config({str(REPO / "config.yaml")!r})
        command = [sys.executable, str(WORKERS_DIR / "mean_brightness_worker.py")]
        with build_reward_from_config({{"name": "worker", "command": command}}) as reward:
            score = reward.score(torch.zeros(1, 3, 4, 4), ["a"])
        print(config["results_dir"], float(score))
    """)
    # -I: no user site and no current folder, so only the installed copy (and the environment's packages) load.
    result = subprocess.run([sys.executable, "-I", "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results_dir, score = result.stdout.split()
    assert results_dir == "results" and abs(float(score) - 128 / 255) < 1e-6  # zeros are mid-grey pixels
