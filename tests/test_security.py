"""Nothing in the project unpickles data: checkpoints and models load through safetensors,
and a .pt file, where one cannot be avoided, through torch.load(weights_only=True).

An AST scan of every Python file of the package, the benchmarks and the scripts, so code
added later (trainer checkpoints, model loading) is held to the same rule.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ["unlearn_ext", "benchmarks", "scripts", "examples"]

# Calls that unpickle (or run arbitrary code from) their input, by dotted name.
UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
    "joblib.load", "pandas.read_pickle", "pd.read_pickle", "marshal.load", "marshal.loads",
    "shelve.open", "cloudpickle.load", "cloudpickle.loads",
}
UNSAFE_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that can unpickle untrusted data."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in UNSAFE_CALLS:
            found.append(f"{where}: {name}()")
        elif name in ("torch.load", "torch.serialization.load"):
            if not is_true(kwargs.get("weights_only")):
                found.append(f"{where}: torch.load() without weights_only=True")
        elif name in ("numpy.load", "np.load") and "allow_pickle" in kwargs and not (
                isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
            found.append(f"{where}: {name}(allow_pickle=...)")
        elif name == "yaml.load" and "Loader" not in kwargs:
            found.append(f"{where}: yaml.load() without a safe Loader")
    return found


def project_files():
    for folder in SCANNED:
        yield from sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else ()


def test_nothing_unpickles_untrusted_data():
    files = list(project_files())
    assert any(f.name == "__init__.py" for f in files), "the scan found no package files"
    problems = [p for f in files for p in findings(f.read_text(), str(f.relative_to(ROOT)))]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)


def test_the_scan_catches_unsafe_loading():
    bad = """
import pickle
import torch, numpy as np
from dill import loads
state = torch.load("ckpt.pt")
state = torch.load("ckpt.pt", weights_only=False)
obj = pickle.loads(blob)
arr = np.load("x.npy", allow_pickle=True)
"""
    assert len(findings(bad)) == 6, findings(bad)
    good = """
import torch
from safetensors.torch import load_file
state = torch.load("ckpt.pt", weights_only=True, map_location="cpu")
weights = load_file("model.safetensors")
"""
    assert findings(good) == []
