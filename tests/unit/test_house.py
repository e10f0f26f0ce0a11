"""The shape of the package (#14): imports run downwards only, no package cycle, small files and functions, the
GAD stages on one screen; the tests and benchmarks load models and read JSONL through the one call each."""

import ast
import os

import pytest

from conftest import ROOT  # noqa: E402  (the repository root)
PKG = os.path.join(ROOT, "gad_megatron")
# Lower packages first: a package may import only those before it (and itself).
ORDER = ["runtime", "algo", "models", "convert", "rollout", "data", "eval", "trainer", "plan", "doctor", "testing"]


def _sources(root):
    for d, _, names in os.walk(root):
        for n in sorted(names):
            if n.endswith(".py"):
                p = os.path.join(d, n)
                yield p, open(p, encoding="utf-8").read()


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def package_edges() -> dict:
    edges = {}
    for path, src in _sources(PKG):
        sub = os.path.relpath(path, PKG).split(os.sep)[0]
        if sub.endswith(".py"):
            continue
        for mod in _imports(ast.parse(src)):
            parts = mod.split(".")
            if parts[0] == "gad_megatron" and len(parts) > 1 and parts[1] != sub and parts[1] in ORDER:
                edges.setdefault(sub, {}).setdefault(parts[1], os.path.relpath(path, ROOT))
    return edges


def test_every_package_is_placed_in_the_order():
    pkgs = {d for d in os.listdir(PKG) if os.path.isfile(os.path.join(PKG, d, "__init__.py"))}
    assert pkgs == set(ORDER), f"packages not in ORDER (or gone): {pkgs ^ set(ORDER)}"


def test_imports_only_run_downwards_and_never_cycle():
    up = [f"{where}: {a} imports {b}" for a, targets in package_edges().items() for b, where in targets.items()
          if ORDER.index(b) > ORDER.index(a)]
    assert not up, "imports from a lower package to a higher one:\n" + "\n".join(up)


def _string_imports(tree):
    """Modules named in strings: ``importlib.import_module("gad_megatron.x")``, registries' ``"gad_megatron.x:Class"``,
    dotted class paths handed to a library (``"gad_megatron.x.Class"``): an import by another road."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("gad_megatron."):
            name = node.value.split(":")[0]
            if name.replace(".", "").replace("_", "").isalnum():
                yield name


def module_edges() -> dict:
    """{module: {module it imports}} over gad_megatron's own modules (function-local imports and imports by
    string included: a circle through a function or a registry is still a circle a reader must follow)."""
    mods = {}
    for path, src in _sources(PKG):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[rel.removesuffix(".__init__")] = src
    edges = {}
    for mod, src in mods.items():
        tree = ast.parse(src)
        for name in [*_imports(tree), *_string_imports(tree)]:
            while name and name not in mods:  # gad_megatron.trainer.gad.stage_gad -> gad_megatron.trainer.gad
                name = name.rpartition(".")[0]
            # a package itself (gad_megatron.trainer of `from gad_megatron.trainer import gad`) is not a file read
            if name and name != mod and name.count(".") > 1:
                edges.setdefault(mod, set()).add(name)
    return edges


def file_circles(edges: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_file_imports_itself_through_a_circle():
    circles = file_circles(module_edges())
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_imports_by_string_are_edges():
    edges = module_edges()
    assert "gad_megatron.trainer.opd" in edges["gad_megatron.trainer.reward_registry"]  # REWARDS' "module:Class"
    assert "gad_megatron.rollout.vllm_engine" in edges["gad_megatron.rollout.factory"]  # ENGINES'
    tree = ast.parse('import importlib\nimportlib.import_module("gad_megatron.trainer.opd")\nX = "gad_megatron.a.b:C"\n')
    assert sorted(_string_imports(tree)) == ["gad_megatron.a.b", "gad_megatron.trainer.opd"]


def test_the_circle_finder_finds_a_circle():
    assert file_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert file_circles({"a": {"b"}, "b": set()}) == []


def test_algo_is_pure_tensor_math():
    for path, src in _sources(os.path.join(PKG, "algo")):
        bad = [m for m in _imports(ast.parse(src)) if m.split(".")[0] in ("megatron", "gad_megatron")]
        assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("limit_file, limit_fn", [(500, 80)])
def test_files_and_functions_stay_small(limit_file, limit_fn):
    big = []
    for path, src in _sources(PKG):
        rel = os.path.relpath(path, ROOT)
        if src.count("\n") + 1 > limit_file:
            big.append(f"{rel}: {src.count(chr(10)) + 1} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit_fn:
                    big.append(f"{rel}:{node.name}: {n} lines")
    gad = open(os.path.join(PKG, "trainer", "gad.py")).read()
    if gad.count("\n") + 1 > 300:
        big.append(f"trainer/gad.py: {gad.count(chr(10)) + 1} lines (the stages must read in one screen: <= 300)")
    loop = next(n for n in ast.walk(ast.parse(open(os.path.join(PKG, "trainer", "run.py")).read()))
                if isinstance(n, ast.FunctionDef) and n.name == "train")
    if loop.end_lineno - loop.lineno + 1 > 60:
        big.append(f"trainer/run.py:train: {loop.end_lineno - loop.lineno + 1} lines (the loop: <= 60)")
    assert not big, "\n".join(big)


def _calls(root, names):
    found = []
    for path, src in _sources(root):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in names:
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {name}")
    return found


def test_models_are_built_and_loaded_from_hf_through_one_call():
    """Tests and benchmarks use ``convert.api.load_from_hf`` (or ``load_model``), not their own
    build-then-fill copies."""
    found = [c for d in ("tests", "benchmarks", "tools") for c in _calls(os.path.join(ROOT, d),
                                                                        {"load_hf_into_model", "HFWeightSource"})]
    assert not found, "build-and-load written out again:\n" + "\n".join(found)


def test_jsonl_is_parsed_in_one_place():
    """Every JSONL file the package reads goes through ``data/jsonl.py``: a parse of a line anywhere else is a
    second reader (with its own idea of bad lines and encodings)."""
    found = []
    for path, src in _sources(PKG):
        if path.endswith(os.path.join("data", "jsonl.py")):
            continue
        for node in ast.walk(ast.parse(src)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "loads"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ("line", "raw", "l")):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not found, "JSONL lines parsed outside data/jsonl.py:\n" + "\n".join(found)


def test_device_questions_go_through_runtime_device():
    """``torch.cuda.is_available()`` ignores ``parallel.device``: only the runtime's one decision may ask it."""
    allowed = {os.path.join("runtime", "parallel.py"), os.path.join("runtime", "cpu_shim.py")}
    found = []
    for path, src in _sources(PKG):
        if os.path.relpath(path, PKG) in allowed:
            continue
        if "cuda.is_available()" in src:
            found.append(os.path.relpath(path, ROOT))
    assert not found, f"device decided outside runtime.device(): {found}"


def test_transport_choices_come_from_the_registry():
    from gad_megatron.rollout import transport as T
    from gad_megatron.trainer.config import _CHOICES, ConfigError, load_config

    assert _CHOICES["rollout.transport"] == T.transport_choices() == ("auto",) + tuple(T.TRANSPORTS)
    assert all(issubclass(c, T.Transport) and c.name == n for n, c in T.TRANSPORTS.items())

    @T.register
    class Pigeon(T.Transport):
        name = "pigeon"

    try:
        assert isinstance(T.make_transport("pigeon"), Pigeon)
        assert "pigeon" in T.transport_choices()
    finally:
        del T.TRANSPORTS["pigeon"]
    with pytest.raises(ValueError, match="pigeon"):
        T.make_transport("pigeon")
    with pytest.raises(ConfigError, match="rollout.transport"):
        load_config(base={"model": {"student": "x"}, "data": {"train": "y"}, "rollout": {"transport": "pigeon"}})


def test_runtime_device_follows_the_configured_device(monkeypatch):
    import torch

    from gad_megatron.runtime import device, parallel

    monkeypatch.setattr(parallel, "_DEVICE", "cpu")
    assert device() == torch.device("cpu")
    monkeypatch.setattr(parallel, "_DEVICE", None)
    assert device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_vllm_eager_default_follows_the_device():
    from gad_megatron.trainer.config import load_config

    cfg = load_config(base={"model": {"student": "x"}, "data": {"train": "y"}})
    assert cfg.rollout.enforce_eager is None  # decided by the engine: eager on CPU, CUDA graphs on GPU
    cfg = load_config(base={"model": {"student": "x"}, "data": {"train": "y"}}, overrides=["rollout.enforce_eager=true"])
    assert cfg.rollout.enforce_eager is True


# ---- #34: each reward and engine is named only by its registry and its own module ------------------------------
# Calls whose string argument is a Python package or logger, not a registry entry ("vllm" the package).
PACKAGE_NAME_CALLS = {"getLogger", "find_spec", "import_module", "version", "_version", "requires"}


def spelled_names(src: str, names: set) -> list:
    """(line, name) of every string literal in ``src`` equal to one of ``names``, except a package's name given to
    a call of PACKAGE_NAME_CALLS."""
    tree = ast.parse(src)
    exempt = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn in PACKAGE_NAME_CALLS:
                exempt.update(id(a) for a in node.args)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
            and id(node) not in exempt]


def registry_homes() -> dict:
    """{name: files allowed to spell it}: its registry and the module of its class (D's role name: models/roles)."""
    from gad_megatron.models.roles import D_ROLE
    from gad_megatron.rollout.factory import ENGINES
    from gad_megatron.trainer.reward_registry import REWARDS

    def path(module):
        return os.path.join(*module.split(".")) + ".py"

    homes = {}
    for registry, entries in ((path("gad_megatron.trainer.reward_registry"), REWARDS), (path("gad_megatron.rollout.factory"), ENGINES)):
        for name, target in entries.items():
            homes.setdefault(name, {registry}).add(path(target.split(":")[0]))
    homes.setdefault(D_ROLE, set()).add(path("gad_megatron.models.roles"))
    return homes


def test_no_reward_or_engine_name_is_spelled_outside_its_module():
    """A new reward or engine touches one file: nothing else branches on, defaults to or lists a registry name;
    the trainer, planner, gad-eval and gad-doctor ask the registered class."""
    homes = registry_homes()
    assert {"discriminator", "opd", "gad+opd", "vllm", "megatron"} <= set(homes)
    found = []
    for p, src in _sources(PKG):
        rel = os.path.relpath(p, ROOT)
        found += [f"{rel}:{line}: {name!r}" for line, name in spelled_names(src, set(homes)) if rel not in homes[name]]
    assert not found, "registry names spelled outside their modules:\n" + "\n".join(found)


def test_the_name_scan_finds_a_spelled_name():
    src = 'import logging\nlogging.getLogger("vllm")\nif cfg.reward.source in ("opd", "x"):\n    engine = "megatron"\n'
    assert sorted(spelled_names(src, {"opd", "megatron", "vllm"})) == [(3, "opd"), (4, "megatron")]


def local_package_imports() -> list:
    """(file, line, has a reason) of every import of gad_megatron itself inside a function."""
    out = []
    for path, src in _sources(PKG):
        lines = src.split("\n")
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else \
                    node.names[0].name if isinstance(node, ast.Import) else None
                if mod and mod.startswith("gad_megatron"):
                    said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    out.append((os.path.relpath(path, ROOT), node.lineno, said))
    return out


def test_the_package_imports_itself_at_the_top_of_its_files():
    """#34 item 4: a dependency is read at the top of the file; the few left inside a function say why (CPU only,
    a registry read on first use)."""
    found = local_package_imports()
    assert len(found) < 30, f"{len(found)} function-local imports of gad_megatron (fewer than 30 wanted)"
    silent = [f"{p}:{line}" for p, line, said in found if not said]
    assert not silent, "function-local imports of gad_megatron without a comment saying why:\n" + "\n".join(silent)
