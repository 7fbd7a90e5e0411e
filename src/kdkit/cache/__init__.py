"""Teacher-output cache (FKD-style): run the teacher once over K stored views per image, then replay.

* :mod:`~kdkit.cache.views` -- the stored crop/flip parameters and which view a sample reads each epoch.
* :mod:`~kdkit.cache.store` -- memory-mapped arrays + manifest, atomic finalize, identity checks.
* :mod:`~kdkit.cache.build` -- the teacher over every view, written atomically.
* :mod:`~kdkit.cache.replay` -- the loader's replay and the :class:`CachedTeacher` used in training.

None of them knows a recipe: :mod:`kdkit.teacher_cache` derives a recipe's cache identity and folder and
opens or builds it.
"""

from kdkit.cache.build import write_cache
from kdkit.cache.replay import CachedTeacher, ViewReplay
from kdkit.cache.store import TeacherCache, read_manifest

__all__ = ["CachedTeacher", "TeacherCache", "ViewReplay", "read_manifest", "write_cache"]
