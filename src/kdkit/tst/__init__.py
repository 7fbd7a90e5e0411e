"""TST (Shao et al., IJCAI 2023): distil on samples the teacher gets right and the student gets wrong.

* :mod:`kdkit.tst.ops` -- differentiable image operations with AutoAugment's semantics.
* :mod:`kdkit.tst.policy` -- :class:`AugmentPolicy`, learnable probabilities and magnitudes.
* :mod:`kdkit.tst.trainer` -- the alternating optimisation as engine hooks (recipe section ``tst:``).
"""

from kdkit.tst.ops import OPS
from kdkit.tst.policy import AugmentPolicy, batch_generator

__all__ = ["OPS", "AugmentPolicy", "batch_generator"]
