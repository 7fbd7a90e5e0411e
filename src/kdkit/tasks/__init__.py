"""Built-in tasks, one module each (see :mod:`kdkit.task` for the contract).

Importing this package registers them; :func:`kdkit.registry.load_plugins` does so on the first registry read.
"""

from kdkit.tasks import classification, detection, multilabel, seg_boundary, segmentation  # noqa: F401 - each registers its task
