"""The package's folders import downward only: base -> kernels -> models -> quant / watermark -> io -> eval ->
card -> serve -> cli. In particular the model layer knows nothing of quantization (the KV cache protocol lives in
models/)."""

import ast
from pathlib import Path

import ligero

ORDER = {"errors": 0, "paths": 0, "progress": 0, "__init__": 0, "kernels": 1, "models": 2, "quant": 3, "watermark": 3,
         "io": 4, "vision": 4, "eval": 5, "lab": 5, "card": 6, "serve": 7, "cli": 8, "__main__": 9}
ROOT = Path(ligero.__file__).parent


def ligero_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level ligero module) of every import in the file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ligero":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("ligero.")]
        else:
            continue
        found += [(node.lineno, name if name in ORDER else "__init__") for name in names]
    return found


def test_folders_import_downward_only():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = path.relative_to(ROOT).parts[0].removesuffix(".py")
        upward += [f"{path.relative_to(ROOT)}:{line} imports ligero.{target}"
                   for line, target in ligero_imports(path) if ORDER[target] > ORDER[layer]]
    assert not upward, upward


def test_the_model_layer_and_the_kernels_do_not_reach_up():
    for folder, allowed in (("models", {"errors", "paths", "progress", "kernels", "models"}),
                            ("kernels", {"errors", "paths", "progress"})):
        for path in (ROOT / folder).rglob("*.py"):
            assert {t for _, t in ligero_imports(path)} <= allowed, path


def test_functions_stay_readable_and_create_app_is_wiring():
    """No function in src/ over 100 lines; create_app (serve/app.py) wires the pieces in under 80."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100 or (node.name == "create_app" and lines >= 80):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
