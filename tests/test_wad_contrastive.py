"""WAD's contrastive representation: NT-Xent against a direct transcription of the official formula, its
properties, the SimCLR training (own random state, cache reused), and recipes reading it (no teacher) or refused."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import edit_recipe, write_recipe
from kdkit.build import plan
from kdkit.cli import main
from kdkit.data import UNLABELLED
from kdkit.methods.wad.contrastive import ContrastiveSpec, cached_representation, nt_xent, simclr_augmentation
from kdkit.models import build_model
from kdkit.recipe import recipe_from_dict


def official_nt_xent(outputs: torch.Tensor, temperature: float, eps: float = 1e-8) -> torch.Tensor:
    """WAD-master ``contrast/training/contrastive_loss.py`` (``get_similarity_matrix`` on normalised outputs, then
    ``NT_xent``), transcribed line by line."""
    outputs = outputs / outputs.norm(dim=1, keepdim=True)
    sim_matrix = torch.mm(outputs, outputs.t())
    b = sim_matrix.size(0) // 2
    eye = torch.eye(b * 2, dtype=outputs.dtype)
    sim_matrix = torch.exp(sim_matrix / temperature) * (1 - eye)
    denom = torch.sum(sim_matrix, dim=1, keepdim=True)
    sim_matrix = -torch.log(sim_matrix / (denom + eps) + eps)
    return torch.sum(sim_matrix[:b, b:].diag() + sim_matrix[b:, :b].diag()) / (2 * b)


def paper_nt_xent(outputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss as the paper writes it: mean over the 2B anchors of -log softmax of the positive among the
    2B - 1 others, by explicit loops."""
    z = torch.nn.functional.normalize(outputs, dim=1)
    n = len(z)
    total = outputs.new_zeros(())
    for i in range(n):
        j = (i + n // 2) % n
        others = torch.stack([z[i] @ z[k] / temperature for k in range(n) if k != i])
        total = total - (z[i] @ z[j] / temperature - torch.logsumexp(others, 0))
    return total / n


@pytest.mark.parametrize(("temperature", "scale", "near"), [(0.5, 1.0, 0.0), (0.1, 30.0, 0.0), (0.5, 1.0, 1e-6),
                                                              (2.0, 1e-3, 0.3)])
def test_nt_xent_equals_the_official_formula_and_the_papers_in_float64(temperature: float, scale: float,
                                                                       near: float) -> None:
    g = torch.Generator().manual_seed(0)
    first = torch.randn(6, 16, generator=g, dtype=torch.float64) * scale
    # near > 0: the second views are the first plus a little noise (near-identical views)
    second = first + near * torch.randn(6, 16, generator=g, dtype=torch.float64) if near else \
        torch.randn(6, 16, generator=g, dtype=torch.float64) * scale
    z = torch.cat([first, second]).requires_grad_()
    ours = nt_xent(z, temperature)
    theirs = official_nt_xent(z, temperature)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(theirs, z)[0], rtol=1e-8,
                               atol=1e-12)
    torch.testing.assert_close(nt_xent(z, temperature, eps=0.0), paper_nt_xent(z, temperature), rtol=1e-12,
                               atol=1e-12)


def test_nt_xent_properties_and_precision() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 8, generator=g)
    loss = nt_xent(z)
    perm = torch.randperm(5, generator=g)
    # the same reordering of the images in both views, or swapping the views, changes nothing
    torch.testing.assert_close(nt_xent(torch.cat([z[:5][perm], z[5:][perm]])), loss)
    torch.testing.assert_close(nt_xent(torch.cat([z[5:], z[:5]])), loss)
    # identical views of orthogonal images cost far less than unrelated views
    basis = torch.eye(8)[:5]
    assert float(nt_xent(torch.cat([basis, basis]), 0.1)) < 0.01 < float(loss)
    # a tiny temperature does not overflow (the official exp would in float32)
    assert math.isfinite(float(nt_xent(z, 1e-3)))
    assert nt_xent(z.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="two views"):
        nt_xent(z[:3])


def test_the_views_keep_shape_and_differ_and_grey_images_get_no_colour_ops() -> None:
    aug = simclr_augmentation(1, (12, 12), 0.08)
    names = [type(m).__name__ for m in aug]
    assert names == ["RandomHorizontalFlip", "ColorJitter", "RandomResizedCrop"]
    assert "RandomGrayscale" in [type(m).__name__ for m in simclr_augmentation(3, (12, 12), 0.08)]
    x = torch.rand(4, 1, 12, 12)
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and not torch.equal(a, b)


def test_the_representation_is_trained_under_its_own_random_state_and_cached(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (40, 1, 10, 10), dtype=torch.uint8, generator=g)
    spec = ContrastiveSpec(arch="cnn_student", epochs=2, batch_size=8, cache_dir=str(tmp_path))

    def network() -> torch.nn.Module:
        return build_model("cnn_student", num_classes=3, in_channels=1, image_size=10)

    def represent(settings: ContrastiveSpec) -> tuple:
        return cached_representation(network, "penultimate", images, [0.5], [0.25], settings, torch.device("cpu"))

    torch.manual_seed(5)
    before = torch.get_rng_state()
    first, path, reused = represent(spec)
    assert torch.equal(torch.get_rng_state(), before)  # training and initialisation drew from their own state
    assert first.features.shape == (40, 128) and not reused and path.is_file() and math.isfinite(first.final_loss)
    assert len(first.features.unique(dim=0)) == 40
    # a second run (another student seed, or the resumption) reads the stored features instead of training
    again, same_path, reused = represent(spec)
    assert reused and same_path == path and torch.equal(again.features, first.features)
    # other settings are another representation; the same settings train the same one again, whatever the caller's
    # random state
    assert represent(spec.model_copy(update={"temperature": 0.2}))[1] != path
    path.unlink()
    torch.manual_seed(99)
    retrained, _, reused = represent(spec)
    assert not reused and torch.allclose(retrained.features, first.features, atol=1e-5)


def contrastive_recipe(tiny: dict, tmp_path: Path) -> dict:
    recipe = copy.deepcopy(tiny)
    recipe["data"]["setting"] = {"name": "class_mismatch", "labelled": 60, "unlabelled": 100, "mismatch": 0.5}
    recipe["distill"] = [{"loss": "wad", "weight": 1.0, "representation": "contrastive"}]
    recipe["wad"] = {"contrastive": {"arch": "cnn_student", "epochs": 1, "batch_size": 32,
                                     "cache_dir": str(tmp_path / "wad")}}
    recipe["train"]["ce_weight"] = 1.0
    return recipe


def test_a_contrastive_wad_recipe_needs_no_teacher_and_its_tables_come_from_the_representation(
        tiny: dict, tmp_path: Path) -> None:
    from kdkit.methods.wad import WadMethod

    built = plan(recipe_from_dict(contrastive_recipe(tiny, tmp_path)), training=True)
    assert built.teacher is None
    run = WadMethod().attach(built, None)
    loss = built.objective.terms[0].loss
    unlabelled = built.data.train_labels == UNLABELLED
    assert torch.equal(loss.pseudo[~unlabelled], built.data.train_labels[~unlabelled])
    weights = loss.weight[unlabelled]
    assert bool((weights >= 0).all()) and len(weights.unique()) > 50
    facts = run.facts  # what summary.json's `wad` section holds before any round
    assert facts["representation"] == "contrastive" and not facts["reused"] and facts["arch"] == "cnn_student"
    assert math.isclose(facts["mean_weight_unlabelled"], float(weights.mean()), rel_tol=1e-5)
    assert WadMethod().attach(plan(recipe_from_dict(contrastive_recipe(tiny, tmp_path)), training=True),
                              None).facts["reused"]


@pytest.mark.parametrize(("change", "with_teacher", "message"), [
    ({"distill.0": {"loss": "wad", "representation": "contrastive", "teacher": "penultimate"}}, True,
     "reads no teacher tap here"),
    ({"distill.0": {"loss": "wad"}}, True, "the wad term reads the teacher's"),
    ({"wad.contrastive.arch": "cnn_studnt"}, False, "closest: cnn_student"),
    ({"distill.0": {"loss": "wad", "representation": "simclr"}}, False, "representation"),
    ({"wad.contrastive.epochs": 0}, False, "epochs"),
])
def test_contrastive_recipes_that_cannot_work_are_refused(change: dict, with_teacher: bool, message: str,
                                                         tiny_kd: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    recipe = edit_recipe(contrastive_recipe(tiny_kd, tmp_path), change)
    if not with_teacher:
        del recipe["teacher"]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert message in capsys.readouterr().err
