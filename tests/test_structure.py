"""The shape of the house: imports point down the layers with no cycles, and a wheel holds everything.

The layers (DESIGN.md), lowest first; a module may import its own package, and any lower layer:

    errors, atomic, tables, config  ->  parallel, kernels, data  ->  model  ->  checkpoint  ->  convert
    ->  eval, plan, bench  ->  train  ->  megaolmo (the public API)
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    {"errors", "atomic", "tables", "config"},
    {"parallel", "kernels", "data"},
    {"model"},
    {"checkpoint"},
    {"convert"},
    {"eval", "plan", "bench"},
    {"train"},
]


def module_files() -> dict[str, Path]:
    """Every megaolmo module by dotted name (kernels/ is megaolmo.kernels)."""
    modules = {}
    for base, prefix in ((ROOT / "megaolmo", "megaolmo"), (ROOT / "kernels", "megaolmo.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The megaolmo modules `path` imports (at any depth of the file), resolved to module names."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # megaolmo/__init__.py: the public API on top
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: place its package there")


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = import_graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert len(graph) > 50 and not cycles, f"import cycles: {cycles}"


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module) and target.split(".")[:2] != module.split(".")[:2]
    ]
    assert not upward, "imports that point up the house:\n" + "\n".join(sorted(upward))


def test_importing_megaolmo_leaves_triton_alone() -> None:
    """Triton's interpreter (TRITON_INTERPRET=1, how CPUs run the kernels) must be chosen before Triton is
    imported, and `python -m megaolmo.bench` imports the megaolmo package before it can choose."""
    code = "import sys, megaolmo, megaolmo.checkpoint, megaolmo.data; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# Everything megaolmo installs besides torch and triton (setup.py), as absent as on a bare GPU node; numpy
# stays, which Triton's interpreter (how the kernel tests run on CPU) needs itself.
BESIDES_TORCH = ["yaml", "omegaconf", "hydra", "hydra_plugins", "safetensors", "tokenizers", "tqdm",
                 "tensorboard", "matplotlib", "submitit", "transformers", "torchao"]  # fmt: skip
WITHOUT_THEM = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BESIDES_TORCH!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
"""


def test_kernels_and_their_tests_need_only_torch_triton_and_pytest() -> None:
    """On a GPU node with nothing but torch, triton and pytest, the kernels import, the model builds and runs
    with them, and the kernel tests collect."""
    run = (
        WITHOUT_THEM
        + """
import megaolmo.kernels
import torch
from megaolmo import ModelConfig, build_model
model = build_model(ModelConfig(d_model=64, n_layers=1, n_heads=4, ffn_hidden_size=96, vocab_size=256), device="cpu")
assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
import pytest
sys.exit(pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_kernels.py"]))
"""
    )
    bare = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # installed plugins (hydra's) are not there
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=ROOT, env=bare,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_wheel_installs_everything_and_runs_without_the_checkout(tmp_path: Path) -> None:
    """`pip install .` (no -e) into a fresh environment: the entry points run from a directory with no checkout."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    # From a copy: setuptools builds in <source>/build, whose leftovers would otherwise leak into later wheels.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("megaolmo-*.whl")
    fresh = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    site = next((fresh / "lib").glob("python3*/site-packages"))
    # The dependencies (torch, hydra, ...) come from this environment, as a plain path: its .pth files, the
    # editable install of this checkout among them, are not run.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "dependencies.pth").write_text("\n".join(deps) + "\n")
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel]
    subprocess.run(install, check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> str:
        result = subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
        return result.stdout

    where = run("-c", "import megaolmo, megaolmo.kernels, megaolmo.config as c; print(megaolmo.__file__, c.CONF_DIR)")
    assert str(ROOT) not in where and where.count(str(site)) == 2, where
    assert "d_model: 256" in run("-m", "megaolmo.train", "--cfg", "job")
    assert "65.58B parameters" in run("-m", "megaolmo.plan", "experiment=olmo_65b")
    assert "from-hf" in run("-m", "megaolmo.convert", "--help")


@pytest.mark.parametrize(
    "module", ["megaolmo.train", "megaolmo.eval", "megaolmo.plan", "megaolmo.convert", "megaolmo.bench"]
)
def test_entry_points_report_bad_input_in_one_line(module: str, tmp_path: Path) -> None:
    """Every entry point turns a MegaolmoError into one `error:` line and exit code 2."""
    args = {
        "megaolmo.train": ["model.n_heads=3"],
        "megaolmo.eval": ["perplexity", str(tmp_path / "missing"), str(tmp_path), "--tokenizer", "none.json"],
        "megaolmo.plan": ["parallel.tp=3"],
        "megaolmo.convert": ["consolidate", str(tmp_path / "missing"), str(tmp_path / "out")],
        "megaolmo.bench": ["step", "--model", "no_such_preset"],
    }[module]
    command = [sys.executable, "-m", module, *args]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
