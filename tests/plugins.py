"""Plug-ins written by a test: a folder whose modules count as modules of a package (as a new
file in the package's folder would), for the packages that find their plug-ins by module name
(ma2mba_jax.evals, ma2mba_jax.data.formats)."""

import contextlib
import os
import sys
from types import ModuleType


@contextlib.contextmanager
def plugin_folder(package: ModuleType, folder: str):
  """Inside: modules written to `folder` are found as `package.<name>`. After: the folder is
  off the package's path and the modules loaded from it are forgotten."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  package.__path__.insert(0, folder)
  try:
    yield folder
  finally:
    package.__path__.remove(folder)
    for name, module in list(sys.modules.items()):
      if name.startswith(package.__name__ + ".") and (
          getattr(module, "__file__", None) or "").startswith(folder + os.sep):
        del sys.modules[name]
