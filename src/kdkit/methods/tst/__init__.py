"""TST (Shao et al., IJCAI 2023): distil on samples the teacher gets right and the student gets wrong.

* :mod:`kdkit.methods.tst.ops` -- differentiable image operations with AutoAugment's semantics.
* :mod:`kdkit.methods.tst.policy` -- :class:`AugmentPolicy`, learnable probabilities and magnitudes.
* :mod:`kdkit.methods.tst.trainer` -- the alternating optimisation as engine hooks.
* :mod:`kdkit.methods.tst.method` -- the registered method: recipe section ``tst:``, hooks, summary, report.
"""

from kdkit.methods.tst.method import TstMethod
from kdkit.methods.tst.ops import OPS
from kdkit.methods.tst.policy import AugmentPolicy, batch_generator
from kdkit.methods.tst.spec import TstSpec

__all__ = ["OPS", "AugmentPolicy", "TstMethod", "TstSpec", "batch_generator"]
