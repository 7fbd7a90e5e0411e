"""The ``tst:`` recipe section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdkit.methods.tst.ops import OPS
from kdkit.schema import Strict

#: The operation names a recipe may list: exactly the implemented operations.
TstOp = Literal[tuple(OPS)]  # type: ignore[valid-type]


class TstSpec(Strict):
    """TST's learned augmentation (Shao et al., IJCAI 2023; :mod:`kdkit.methods.tst`): at ``policy_epochs`` the
    policy is trained to make samples the teacher gets right and the student gets wrong; every training
    batch is ``[policy(x); x]`` (the distill terms and CE then average the two halves)."""

    ops: list[TstOp] = Field(default_factory=lambda: list(OPS), description="operations (color only for RGB data)")
    num_ops: int = Field(4, ge=1, description="operations drawn per batch")
    temperature: float = Field(0.05, gt=0, description="relaxed Bernoulli temperature of the probabilities")
    policy_epochs: list[int] = Field(default_factory=lambda: [30, 90], description="epochs (0-based) at whose "
                                     "start the policy is trained (teacher and student frozen)")
    policy_passes: float = Field(30.0, gt=0, description="passes over the training set per policy phase")
    lr: float = Field(0.01, gt=0, description="SGD learning rate of the policy")
    momentum: float = Field(0.9, ge=0, description="SGD momentum of the policy")
    grad_clip: float = Field(10.0, gt=0, description="gradient-norm clip of the policy's step")
    random_sign: bool = Field(True, description="apply signed operations in a random direction per sample, as "
                              "AutoAugment does")
    cutout_size: float = Field(0.5, gt=0, le=1, description="cutout square side, as a fraction of the image side")

    @model_validator(mode="after")
    def _consistent(self) -> TstSpec:
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"tst.ops lists an operation twice: {self.ops}")
        if self.num_ops > len(self.ops):
            raise ValueError(f"tst.num_ops {self.num_ops} is more than the {len(self.ops)} operations in tst.ops")
        if any(e < 0 for e in self.policy_epochs):
            raise ValueError(f"tst.policy_epochs must be epoch numbers >= 0, got {self.policy_epochs}")
        return self
