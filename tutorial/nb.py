"""What every notebook's first cell needs, in one place.

    import sys; sys.path.insert(0, "..")  # tutorial/, where this file lives
    from nb import setup
    ROOT, RUNS, ch = setup("04_dpo")

`setup` finds the repository root, empties runs/nbNN/ (a chapter resumes from checkpoints it
finds, so every notebook run starts clean), fixes the thread count at 2 (the order of float sums,
which the parity checks compare bit for bit, depends on it), loads the chapter's train.py as a
module (its folder name starts with a digit, so `import` cannot), and sets a plain plot style.

Running a notebook changes no tracked file: `save_figure` writes docs/NN_*.png only when
WRITE_DOCS=1, which `make docs` sets.
"""
import importlib.util
import os
import shutil

import torch

THREADS = 2


def repository_root(start=None):
    """The folder above `start` (default: the working directory) that holds pyproject.toml."""
    root = os.path.abspath(start or os.getcwd())
    while not os.path.exists(os.path.join(root, "pyproject.toml")):
        parent = os.path.dirname(root)
        if parent == root:
            raise FileNotFoundError("run this notebook from inside the repository: no "
                                    "pyproject.toml above the working directory")
        root = parent
    return root


def load_chapter(folder, root=None):
    """tutorial/<folder>/train.py as a module, e.g. load_chapter("03_ddp")."""
    path = os.path.join(root or repository_root(), "tutorial", folder, "train.py")
    spec = importlib.util.spec_from_file_location(f"chapter_{folder[:2]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup(folder):
    """(ROOT, RUNS, chapter module) for the notebook of tutorial/<folder>."""
    import matplotlib

    torch.set_num_threads(THREADS)
    root = repository_root()
    runs = os.path.join(root, "runs", f"nb{folder[:2]}")
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(runs)
    matplotlib.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
    return root, runs, load_chapter(folder, root)


def save_figure(fig, name):
    """docs/<name>, the README's plot, only under `make docs` (WRITE_DOCS=1): a notebook run
    must not rewrite tracked files. Returns the path written, or None."""
    if os.environ.get("WRITE_DOCS") != "1":
        return None
    path = os.path.join(repository_root(), "docs", name)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
