"""Built-in methods, one folder each (see :mod:`kdkit.method` for the contract, docs/adding-a-method.md).

Importing this package registers them; :func:`kdkit.registry.load_plugins` does so on the first registry
lookup. Methods never import each other.
"""

# one registration line per method (ruff's isort would merge them: keep them apart)
from kdkit.methods import bacs  # noqa: F401, I001
from kdkit.methods import byot  # noqa: F401
from kdkit.methods import crkd  # noqa: F401
from kdkit.methods import ctcl  # noqa: F401
from kdkit.methods import dho  # noqa: F401
from kdkit.methods import ferkd  # noqa: F401
from kdkit.methods import fmkt  # noqa: F401
from kdkit.methods import kd3  # noqa: F401
from kdkit.methods import lelp  # noqa: F401
from kdkit.methods import mdcs  # noqa: F401
from kdkit.methods import meal_v2  # noqa: F401
from kdkit.methods import mst_distill  # noqa: F401
from kdkit.methods import orc  # noqa: F401
from kdkit.methods import source_select  # noqa: F401
from kdkit.methods import ssld  # noqa: F401
from kdkit.methods import tst  # noqa: F401
from kdkit.methods import wad  # noqa: F401
from kdkit.methods import unikd  # noqa: F401
