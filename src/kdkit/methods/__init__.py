"""Built-in methods, one folder each (see :mod:`kdkit.method` for the contract, docs/adding-a-method.md).

Importing this package registers them; :func:`kdkit.registry.load_plugins` does so on the first registry
lookup. Methods never import each other.
"""

from kdkit.methods import fmkt, tst  # noqa: F401 - one registration line per method
