"""Package names imported on first use (PEP 562), so importing a package costs nothing it does not use.

``loaders`` and ``loaders.convert`` re-export their public names this way: ``ecomaug shard`` must
not pay for importing torch in its parent process, which never needs it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` on first use and returns its ``name``.

    Args:
        package: the package's ``__name__`` (for the error message).
        exports: public name -> the module defining it.

    Raises:
        AttributeError: (from the returned function) a name the package does not export.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
