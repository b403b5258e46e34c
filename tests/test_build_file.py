"""The Bazel BUILD file lists every module, CLI and test, so it cannot silently rot."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _targets():
    """(kind, name, .py sources, deps) of every rule, each rule read up to its closing parenthesis."""
    text = (ROOT / "BUILD").read_text()
    targets = []
    for match in re.finditer(r"(py_library|py_binary|py_test)\(", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        body = text[match.end():end]
        name = re.search(r"name\s*=\s*\"([^\"]+)\"", body).group(1)
        targets.append((match.group(1), name, re.findall(r"\"([^\"]+\.py)\"", body),
                        re.findall(r"\":([^\"]+)\"", body)))
    return targets


def _sources(folder, pattern="*.py"):
    return {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob(pattern) if "testdata" not in p.parts}


def test_every_module_cli_and_test_has_a_target():
    listed = {kind: set() for kind in ("py_library", "py_binary", "py_test")}
    for kind, _, srcs, _ in _targets():
        listed[kind].update(srcs)
    assert (_sources("mess_tf") | _sources("mess_cli")) - listed["py_library"] == set()
    cli_sources = {s for s in _sources("tools") | _sources("android_bench") if not s.endswith("__init__.py")}
    assert cli_sources - listed["py_binary"] - listed["py_library"] == set()
    assert _sources("bench") - listed["py_binary"] == set()
    assert _sources("tests", "test_*.py") - listed["py_test"] == set()


def test_every_dependency_names_a_target():
    targets = _targets()
    names = {name for _, name, _, _ in targets}
    for _, name, _, deps in targets:
        assert set(deps) <= names, f"{name} depends on unknown targets {set(deps) - names}"
