"""Activate the extension at interpreter start, so plain ``llamafactory-cli`` runs load Lance too.

Importing LLaMA-Factory is slow (torch, transformers), so nothing is imported at start-up:
:func:`install_import_hook` registers a finder that calls :func:`llamafactory_ext.activate`
right after ``llamafactory.data.loader`` is first imported, in whichever process that is.

Two ways to run it at start-up (both documented in docs/training.md):

- ``lancetag lf install-hook`` writes ``lancetag_lf.pth`` into site-packages: every process of
  that environment (``llamafactory-cli train``, the web UI's training subprocess) has it;
  ``LANCETAG_LF_EXTENSION=0`` turns it off for one run.
- ``PYTHONPATH=$(lancetag lf hook-path)``: a ``sitecustomize`` for one process tree, without
  touching the environment (what ``lancetag webui`` does for its training subprocess).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

ENV_SWITCH = "LANCETAG_LF_EXTENSION"
TARGET_MODULE = "llamafactory.data.loader"
PTH_NAME = "lancetag_lf.pth"
PTH_LINE = "import llamafactory_ext.hook as _lancetag_hook; _lancetag_hook.install_import_hook()\n"
SITE_DIR = Path(__file__).resolve().parent / "_site"


def enabled() -> bool:
    """Return False when ``LANCETAG_LF_EXTENSION`` is 0/false/off, else True."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


class _ActivateAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``llamafactory.data.loader`` through the normal finders and activates after it executes."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ActivatingLoader(spec.loader)
                return spec
        return None


class _ActivatingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.inner.exec_module(module)
        from llamafactory_ext.patch import activate

        activate()


def install_import_hook() -> bool:
    """Arrange for activation when LLaMA-Factory's loader is imported; return whether it is armed."""
    if not enabled():
        return False
    if TARGET_MODULE in sys.modules:  # already imported: activate now
        from llamafactory_ext.patch import activate

        activate()
        return True
    if not any(isinstance(f, _ActivateAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ActivateAfterImport())
    return True


def default_site_packages() -> Path:
    """Return the site-packages folder of the running interpreter's environment."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def install_pth(site_dir: Path | None = None) -> Path:
    """Write ``lancetag_lf.pth`` into ``site_dir`` (default: this environment's site-packages); return its path."""
    target = Path(site_dir) if site_dir is not None else default_site_packages()
    target.mkdir(parents=True, exist_ok=True)
    path = target / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def uninstall_pth(site_dir: Path | None = None) -> bool:
    """Remove ``lancetag_lf.pth`` from ``site_dir``; return whether it was there."""
    path = (Path(site_dir) if site_dir is not None else default_site_packages()) / PTH_NAME
    if path.exists():
        path.unlink()
        return True
    return False


def pythonpath_with_hook(existing: str | None = None) -> str:
    """Return a PYTHONPATH value that puts the hook's ``sitecustomize`` first."""
    parts = [str(SITE_DIR)] + ([existing] if existing else [])
    return os.pathsep.join(parts)
