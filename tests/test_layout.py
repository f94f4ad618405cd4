"""The repository's layout: the root holds what users run, the library sits in tinylm/ by purpose, imports run one
way with no circles (deferred imports inside functions included), and files stay readable."""

import ast
import glob
import os

from helpers import ROOT

SCRIPTS = {"train", "inference", "evaluate", "dataload"}  # the commands users run; model.py is the module they share


def project_modules() -> dict[str, str]:
    """{dotted module name: file} for the root's modules and everything under tinylm/ (tests and bench aside)."""
    modules = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(ROOT, "*.py"))}
    for f in glob.glob(os.path.join(ROOT, "tinylm", "**", "*.py"), recursive=True):
        name = os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".")
        modules[name.removesuffix(".__init__")] = f
    return modules


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
    """The project modules a file imports anywhere in it, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from tinylm.kernels import native` imports the module tinylm.kernels.native
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def test_the_root_holds_only_what_users_run():
    root_files = os.listdir(ROOT)
    python = sorted(f for f in root_files if f.endswith(".py"))
    assert python == ["dataload.py", "evaluate.py", "inference.py", "model.py", "train.py"]
    assert not [f for f in root_files if f.endswith((".c", ".h", ".html", ".jsonl"))]


def test_imports_have_no_circles_and_the_library_never_imports_a_script():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    for name, deps in graph.items():
        if name.startswith("tinylm") or name == "model":
            assert not deps & SCRIPTS, f"{name} imports the script(s) {sorted(deps & SCRIPTS)}"
    # depth-first search for a cycle, reporting the first one found as a chain of modules
    state, chain = {}, []

    def visit(name):
        state[name] = "open"
        chain.append(name)
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(chain[chain.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        chain.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert {"model", "tinylm.modeling.hf_weights"} <= graph.keys()
    assert "model" not in graph["tinylm.modeling.hf_weights"]  # hf_weights reads and writes files; model builds


def test_no_module_is_over_520_lines_and_no_function_over_90():
    for name, path in project_modules().items():
        text = open(path, encoding="utf-8").read()
        assert text.count("\n") <= 520, f"{name} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 90, f"{name}.{node.name} is {length} lines"


def test_each_c_file_sits_beside_native_py_and_gives_its_build_line():
    from tinylm.kernels.native import BASE_FLAGS, SOURCES
    flags = ["-march=native", *BASE_FLAGS]

    kernels = os.path.join(ROOT, "tinylm", "kernels")
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(kernels, "*.c"))) == sorted(
        f"{name}.c" for name in SOURCES)
    for name in SOURCES:
        header = open(os.path.join(kernels, f"{name}.c"), encoding="utf-8").read().split("#include", 1)[0]
        assert "// Build: cc " in header, f"{name}.c's header has no '// Build:' line"
        lines = header.split("// Build: ", 1)[1].splitlines()
        build = " ".join([lines[0]] + [line[2:] for line in lines[1:] if line.startswith("//   ")]).split()
        assert set(flags) <= set(build) and f"{name}.c" in build, (name, build, flags)
