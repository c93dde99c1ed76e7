"""Register model_type "ouro" and "lt2" with transformers' Auto classes without importing transformers early.

`import lt2convert` must stay cheap (the command line starts in well under a second), so it cannot import torch
and transformers just to call `AutoConfig.register`. Instead it installs an import hook: once transformers' Auto
classes have been imported (`transformers.models.auto.modeling_auto`), the registration runs, as soon as no
transformers module is half-way through its own import. That last condition matters: transformers modules import
the Auto classes from inside their own imports (`modeling_layers` does), and our runtime imports those same
modules, which would then be found partially initialised.

If transformers' Auto classes are already imported when `install()` runs, it registers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType

TRIGGER = "transformers.models.auto.modeling_auto"


def register() -> None:
    """Register now (imports torch and transformers). The runtime's model module registers as it is imported, so
    importing it suffices; if it is importing already, it registers when it finishes."""
    import lt2convert.modeling.modeling_lt2  # noqa: F401


def is_transformers_module(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


class _CountingLoader(importlib.abc.Loader):
    """Wraps a transformers module's loader to know when the outermost transformers import has finished."""

    def __init__(self, inner: importlib.abc.Loader, hook: RegisterAfterTransformers):
        self.inner = inner
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.hook.enter()
        try:
            self.inner.exec_module(module)
        finally:
            self.hook.leave(module.__name__)

    def __getattr__(self, name: str):
        # get_source, get_resource_reader, is_package, ... of the real loader.
        return getattr(self.inner, name)


class RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """A meta-path finder that only observes transformers' imports; it never changes what gets imported."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.pending = False
        self.registering = False

    def depth(self) -> int:
        return getattr(self.local, "depth", 0)

    def enter(self) -> None:
        self.local.depth = self.depth() + 1

    def leave(self, name: str) -> None:
        self.local.depth = self.depth() - 1
        if name == TRIGGER:
            self.pending = True
        if self.pending and self.depth() == 0 and not self.registering:
            self.run()

    def run(self) -> None:
        self.registering = True
        try:
            register()
        except Exception as err:  # never break the user's own import of transformers
            warnings.warn(f"lt2convert could not register ouro/lt2 with transformers' Auto classes: {err}",
                          stacklevel=2)
        finally:
            self.pending = False
            self.registering = False
            uninstall(self)

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if not is_transformers_module(fullname) or self.registering:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CountingLoader(spec.loader, self)
        return spec


def uninstall(hook: RegisterAfterTransformers) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def install() -> None:
    """Arrange for the registration: now if transformers' Auto classes are loaded, else after they are."""
    if TRIGGER in sys.modules:
        register()
        return
    if not any(isinstance(f, RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterTransformers())
