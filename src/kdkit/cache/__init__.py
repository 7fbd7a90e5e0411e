"""Teacher-output cache (FKD-style): run the teacher once over K stored views per image, then replay.

* :mod:`~kdkit.cache.views` -- the stored crop/flip parameters and which view a sample reads each epoch.
* :mod:`~kdkit.cache.store` -- memory-mapped arrays + manifest, atomic finalize, identity checks.
* :mod:`~kdkit.cache.build` -- ``kdkit cache build``: the teacher over every view.
* :mod:`~kdkit.cache.replay` -- the loader's replay and the :class:`CachedTeacher` used in training.
"""

from kdkit.cache.build import cache_folder, cache_identity, open_cache, write_cache
from kdkit.cache.replay import CachedTeacher, ViewReplay
from kdkit.cache.store import TeacherCache, read_manifest

__all__ = ["CachedTeacher", "TeacherCache", "ViewReplay", "cache_folder", "cache_identity", "open_cache",
           "read_manifest", "write_cache"]
