"""The package's imports point one way: down the layers below, never up, and
never in a cycle. Walked with `ast`, at module level and inside functions
(a lazy import is still an arrow), package `__init__` files included."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer (without a cycle) and any
# layer below it.
LAYERS = (
    ("base", ("lm.backend", "lm.checks", "lm.paths", "lm.distributed",
              "lm.metrics", "lm.cpu")),
    ("parallel", ("lm.parallel",)),
    ("models", ("lm.models", "lm.sample")),
    ("config", ("lm.config",)),  # The base config: needs the model families.
    ("data", ("lm.data",)),
    ("quant", ("lm.quant",)),
    ("engine", ("lm.train",)),
    ("tasks", ("lm.tasks",)),
    ("run", ("lm.run",)),
    ("explain", ("lm.explain",)),  # Attention maps, attributions of a run.
    ("interop", ("lm.interop",)),  # Whole runs in and out of other formats.
    ("serve", ("lm.serve",)),  # Requests in, tokens out, over HTTP.
    ("sweep", ("lm.sweep",)),  # Studies whose trials are whole runs.
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((REPO / "lm").rglob("*.py")):
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def layer_of(module: str) -> int:
  if module == "lm":
    return -1  # The root package holds nothing.
  for index, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return index
  raise AssertionError(f"{module} is in no layer of tests/test_layers.py")


def imports_of(module: str) -> set[str]:
  """The lm modules `module` imports anywhere in its file, with the
  packages whose __init__ that import runs."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{a.name}" for a in node.names)
  found = set()
  for name in names:
    while name and name not in MODULES:
      name = name.rpartition(".")[0]
    if name:
      parts = name.split(".")
      found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  own = {".".join(module.split(".")[:i])
         for i in range(1, module.count(".") + 2)}
  return {m for m in found if m in MODULES} - own


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
  for module in MODULES:
    layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
  up = sorted(m for m in GRAPH[module] if layer_of(m) > layer_of(module))
  assert not up, (f"{module} ({LAYERS[layer_of(module)][0]}) imports the "
                  f"higher layer(s) of {up}")


def test_no_cycles():
  order, state = [], {}

  def visit(m, stack):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", "import cycle: " + " -> ".join(
        stack[stack.index(m):] + [m])
    state[m] = "open"
    for dep in sorted(GRAPH[m]):
      visit(dep, stack + [m])
    state[m] = "done"
    order.append(m)

  for module in sorted(GRAPH):
    visit(module, [])
  assert len(order) == len(GRAPH)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  """The checker itself: an import inside a function and a relative one
  both count (a checker that missed them would pass anything)."""
  fake = tmp_path / "lm" / "parallel"
  fake.mkdir(parents=True)
  (fake / "bad.py").write_text(
      "def f():\n  from lm.run import loop\nfrom ..train import step\n")
  monkeypatch.setitem(MODULES, "lm.parallel.bad", fake / "bad.py")
  assert {"lm.run", "lm.run.loop", "lm.train", "lm.train.step"} <= (
      imports_of("lm.parallel.bad"))
