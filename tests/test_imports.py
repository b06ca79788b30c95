"""The package's imports run one way (docs/ARCHITECTURE.md): no import circles between modules,
no module importing one from a layer above its own, and the pure programs free of the host's
machinery. Imports inside functions count too."""

import ast
import pathlib
import subprocess
import sys

import pytest

import ssd_jax

ROOT = pathlib.Path(ssd_jax.__file__).parent

# Lowest first. A module may import from its own layer and the layers below; the longest prefix
# that names a module decides its layer (a package's command line sits above the package).
LAYERS = [
  ("ssd_jax.config", "ssd_jax.sharding", "ssd_jax.timing", "ssd_jax.data"),
  ("ssd_jax.kernels",),
  ("ssd_jax.models",),
  ("ssd_jax.decode",),  # the pure jitted programs
  ("ssd_jax.speculator",),  # the draft side: local, process, remote, channel, worker
  ("ssd_jax.runtime",),  # the Engine and the host loops
  ("ssd_jax.harness", "ssd_jax.bench"),  # modes over prompt sets; benchmarks
  (  # the command lines
    "ssd_jax.cli",
    "ssd_jax.run",
    "ssd_jax.bench.cli",
    "ssd_jax.bench.__main__",
    "ssd_jax.speculator.__main__",
    "ssd_jax.serve",  # the HTTP server
  ),
  ("ssd_jax",),  # the package's own __init__: the public names
]

# What the pure programs never touch: processes, sockets, threads, the file system.
HOST_MACHINERY = ("os", "socket", "subprocess", "threading", "multiprocessing", "signal")


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    out[".".join(parts).removesuffix(".__init__")] = path
  return out


def imports(name: str, path: pathlib.Path, known: dict) -> set[str]:
  """The package modules `name` imports, anywhere in its file (lazy imports included)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{anchor}.{base}".rstrip(".")
      for alias in node.names:
        target = f"{base}.{alias.name}"
        out.add(target if target in known else base)
  return {m for m in out if m in known and m != name}


def layer_of(name: str) -> int:
  best = None
  for i, group in enumerate(LAYERS):
    for prefix in group:
      inside = name == prefix or name.startswith(prefix + ".")
      if inside and (best is None or len(prefix) > len(best[1])):
        best = (i, prefix)  # the longest matching prefix decides
  assert best is not None, f"{name} is in no layer: add it to LAYERS"
  return best[0]


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_every_module_has_a_layer():
  for name in GRAPH:
    layer_of(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_import_from_a_layer_above(name):
  above = [m for m in GRAPH[name] if layer_of(m) > layer_of(name)]
  assert not above, f"{name} (layer {layer_of(name)}) imports {above} from above"


def test_no_import_circles():
  """Depth-first search for a back edge; a package __init__ re-exporting its submodules is not
  a circle unless a submodule imports the __init__ back."""
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(GRAPH[m]):
      if state.get(n) == "open":
        raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n) :], n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_inference_package_never_imports_optax():
  for name, path in modules().items():
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "optax"], name


HTTP_STACK = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic")


@pytest.mark.parametrize("name", sorted(m for m in GRAPH if not m.startswith("ssd_jax.serve")))
def test_only_the_server_imports_the_http_stack(name):
  used = stdlib_imports(modules()[name]) & set(HTTP_STACK)
  assert not used, f"{name} imports {sorted(used)}: the HTTP stack belongs in ssd_jax.serve"


def test_the_check_sees_lazy_imports():
  """A function-level import is an edge like any other (tree_attention imports the Pallas
  kernel only when asked for it; the speculator's entry point imports its worker after pinning
  its cores)."""
  assert "ssd_jax.kernels.pallas_tree_attention" in GRAPH["ssd_jax.kernels.tree_attention"]
  assert "ssd_jax.speculator.worker" in GRAPH["ssd_jax.speculator.__main__"]
  assert "ssd_jax.speculator.__main__" not in GRAPH["ssd_jax.speculator.worker"]


def stdlib_imports(path: pathlib.Path) -> set[str]:
  """Top-level names of every module `path` imports (anywhere in the file)."""
  tree = ast.parse(path.read_text())
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
  return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("name", sorted(m for m in GRAPH if m.startswith("ssd_jax.decode")))
def test_the_pure_programs_touch_no_host_machinery(name):
  used = stdlib_imports(modules()[name]) & set(HOST_MACHINERY)
  assert not used, f"{name} imports {sorted(used)}: host work belongs in runtime or speculator"


def test_the_machinery_check_would_see_it(tmp_path):
  """The check's positive control: a file importing threading is caught."""
  path = tmp_path / "leaky.py"
  path.write_text("def f():\n  import threading\n  from os import path\n")
  assert stdlib_imports(path) & set(HOST_MACHINERY) == {"threading", "os"}


def test_the_default_attention_impl_is_chosen_without_pallas():
  """The public API and the default impl's choice import no Pallas (slow to import, and only
  needed by the kernel itself); a fresh interpreter shows what really loads."""
  code = (
    "import sys, ssd_jax\n"
    "from ssd_jax.kernels import default_impl\n"
    "assert default_impl('cpu') == 'xla'\n"
    "print(sorted(m for m in sys.modules if 'pallas' in m))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
