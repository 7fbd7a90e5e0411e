"""Data settings: each one's construction on small data, determinism by seed, and its refusals."""

from __future__ import annotations

import pytest
import torch

from kdkit.data import SETTINGS, UNLABELLED, ImageData, apply_setting, load_dataset, subset
from kdkit.data.settings.long_tailed import long_tail_counts
from kdkit.data.settings.pruned import teacher_margin
from kdkit.data.settings.shifted import CORRUPTIONS, shifted_pool, split_original_pool
from kdkit.errors import KdkitError


def indexed_data(per_class: tuple[int, ...], test_per_class: int = 3) -> ImageData:
    """Synthetic data whose image ``i`` encodes ``i`` in two pixels (so a setting's choice can be read back)."""
    labels = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(per_class)])
    n = len(labels)
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = (torch.arange(n) % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (torch.arange(n) // 256).to(torch.uint8)
    test_labels = torch.arange(len(per_class)).repeat_interleave(test_per_class)
    test_images = torch.zeros(len(test_labels), 1, 4, 4, dtype=torch.uint8)
    test_images[:, 0, 1, 0] = torch.arange(len(test_labels)).to(torch.uint8)
    return ImageData("toy", images, labels, test_images, test_labels, tuple(f"c{k}" for k in range(len(per_class))),
                     (0.5,), (0.25,), "memory")


def source_index(data: ImageData) -> torch.Tensor:
    """The original index of each training image of :func:`indexed_data` (after a setting)."""
    return data.train_images[:, 0, 0, 0].long() + 256 * data.train_images[:, 0, 0, 1].long()


# -- semi_supervised --------------------------------------------------------------------------------------------------

def test_semi_supervised_split_is_balanced_disjoint_and_the_subsets_labels() -> None:
    data = indexed_data((40, 50, 60))
    out = apply_setting(data, "semi_supervised", {"labelled": 30}, seed=3)
    idx = source_index(out)
    labelled = out.train_labels != UNLABELLED
    assert len(out.train_labels) == 150 and out.num_labelled == 30  # every image kept, 30 labelled
    assert torch.equal(idx, torch.arange(150))  # original order
    assert torch.bincount(out.train_labels[labelled]).tolist() == [10, 10, 10]
    assert torch.equal(out.train_labels[labelled], data.train_labels[idx[labelled]])  # true labels where labelled
    # the labelled images are exactly data.subset's with the same seed (the labels-only baseline's)
    assert torch.equal(out.train_images[labelled], subset(data, 30, seed=3).train_images)
    assert out.test_images is data.test_images or torch.equal(out.test_images, data.test_images)


def test_semi_supervised_is_deterministic_by_seed_and_draws_the_asked_pool() -> None:
    data = indexed_data((40, 50, 60))
    first = apply_setting(data, "semi_supervised", {"labelled": 30, "unlabelled": 20}, seed=1)
    again = apply_setting(data, "semi_supervised", {"labelled": 30, "unlabelled": 20}, seed=1)
    other = apply_setting(data, "semi_supervised", {"labelled": 30, "unlabelled": 20}, seed=2)
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.train_labels, again.train_labels)
    assert not torch.equal(first.train_labels, other.train_labels)
    idx, labelled = source_index(first), first.train_labels != UNLABELLED
    assert (labelled.sum(), (~labelled).sum()) == (30, 20)
    assert len(set(idx[labelled].tolist()) & set(idx[~labelled].tolist())) == 0 and len(set(idx.tolist())) == 50
    # the pool size does not change which images are labelled
    full = apply_setting(data, "semi_supervised", {"labelled": 30}, seed=1)
    assert torch.equal(source_index(full)[full.train_labels != UNLABELLED], idx[labelled])


@pytest.mark.parametrize(("params", "where"), [({"labelled": 200}, "labelled"), ({"labelled": 2}, "labelled"),
                                               ({"labelled": 30, "unlabelled": 121}, "unlabelled")])
def test_semi_supervised_out_of_range_is_refused(params: dict, where: str) -> None:
    with pytest.raises(KdkitError, match=f"data.setting.{where}"):
        apply_setting(indexed_data((40, 50, 60)), "semi_supervised", params, seed=0)


# -- class_mismatch ---------------------------------------------------------------------------------------------------

def test_class_mismatch_labels_known_classes_and_pools_the_stated_fraction_of_unseen_ones() -> None:
    data = indexed_data((30,) * 10, test_per_class=4)
    out = apply_setting(data, "class_mismatch", {"labelled": 60, "unlabelled": 100, "mismatch": 0.3}, seed=0)
    truth = data.train_labels[source_index(out)]
    labelled = out.train_labels != UNLABELLED
    assert out.classes == tuple(f"c{k}" for k in range(6)) and out.num_classes == 6  # default known: 0-5
    assert torch.equal(out.train_labels[labelled], truth[labelled])  # 0-5 keep their numbers
    assert torch.bincount(out.train_labels[labelled]).tolist() == [10] * 6
    pool = truth[~labelled]
    assert len(pool) == 100 and int((pool >= 6).sum()) == 30  # 30 % of the pool from classes 6-9
    assert sorted(torch.bincount(pool[pool >= 6], minlength=10)[6:].tolist()) == [7, 7, 8, 8]  # balanced
    assert torch.equal(out.test_labels, torch.arange(6).repeat_interleave(4))  # test restricted to known classes


def test_class_mismatch_relabels_the_known_classes_in_the_given_order() -> None:
    data = indexed_data((30,) * 4)
    out = apply_setting(data, "class_mismatch", {"known": [3, 1], "labelled": 10, "unlabelled": 20}, seed=0)
    truth = data.train_labels[source_index(out)]
    labelled = out.train_labels != UNLABELLED
    assert out.classes == ("c3", "c1")
    assert torch.equal(torch.where(truth[labelled] == 3, 0, 1), out.train_labels[labelled])
    assert set(truth[~labelled].tolist()) <= {0, 1, 2, 3} and int(torch.isin(truth[~labelled], torch.tensor([0, 2]))
                                                                    .sum()) == 10


def test_class_mismatch_refuses_a_pool_larger_than_the_data() -> None:
    data = indexed_data((30,) * 10)  # 180 images of the known classes 0-5, 120 of the unseen 6-9
    with pytest.raises(KdkitError, match="130 images of the unseen classes but only 120"):
        apply_setting(data, "class_mismatch", {"labelled": 60, "unlabelled": 130, "mismatch": 1.0}, seed=0)
    with pytest.raises(KdkitError, match="150 images of the known classes but only 120"):
        apply_setting(data, "class_mismatch", {"labelled": 60, "unlabelled": 300}, seed=0)


# -- long_tailed ------------------------------------------------------------------------------------------------------

def test_long_tail_counts_follow_the_cifar_lt_rule() -> None:
    # n_i = int(n_max * (1 / imbalance) ** (i / (K - 1))), hand-computed
    assert long_tail_counts(5, 100, 10.0) == [100, 56, 31, 17, 10]
    assert long_tail_counts(10, 6000, 100.0) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_long_tailed_keeps_those_counts_deterministically() -> None:
    data = indexed_data((120, 110, 100, 130, 100))
    out = apply_setting(data, "long_tailed", {"imbalance": 10}, seed=0)
    assert torch.bincount(out.train_labels).tolist() == [100, 56, 31, 17, 10]  # n_max = smallest class (100)
    assert torch.equal(data.train_labels[source_index(out)], out.train_labels)
    assert torch.equal(out.train_images, apply_setting(data, "long_tailed", {"imbalance": 10}, seed=0).train_images)
    assert not torch.equal(out.train_images, apply_setting(data, "long_tailed", {"imbalance": 10}, seed=1).train_images)
    assert torch.equal(out.test_labels, data.test_labels)  # the test split stays balanced
    with pytest.raises(KdkitError, match="max_per_class"):
        apply_setting(data, "long_tailed", {"max_per_class": 121}, seed=0)  # class 0 has 120


# -- novel_classes ----------------------------------------------------------------------------------------------------

def test_novel_classes_unlabel_the_novel_classes_and_renumber_them_last() -> None:
    data = indexed_data((5,) * 6, test_per_class=2)
    out = apply_setting(data, "novel_classes", {"novel": [1, 3]}, seed=0)
    assert out.classes == ("c0", "c2", "c4", "c5", "c1", "c3") and out.novel_classes == (4, 5)
    truth = data.train_labels
    expected = torch.tensor([0, -1, 1, -1, 2, 3]).repeat_interleave(5)
    assert torch.equal(out.train_labels, expected) and torch.equal(truth[source_index(out)], truth)
    assert torch.equal(out.test_labels, torch.tensor([0, 4, 1, 5, 2, 3]).repeat_interleave(2))  # every class tested
    default = apply_setting(data, "novel_classes", {}, seed=0)
    assert default.novel_classes == (3, 4, 5) and default.num_labelled == 15  # the last half is novel


def test_novel_classes_refuse_no_known_class_and_imagedata_refuses_labelled_novel_samples() -> None:
    data = indexed_data((5,) * 3)
    with pytest.raises(KdkitError, match="known"):
        apply_setting(data, "novel_classes", {"novel": [0, 1, 2]}, seed=0)
    with pytest.raises(KdkitError, match="novel classes \\[2\\] have labelled"):
        ImageData("bad", data.train_images, data.train_labels, data.test_images, data.test_labels, data.classes,
                  data.mean, data.std, "x", novel_classes=(2,))


# -- few_classes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [[0, 6], [2, 4, 6], [6, 0]])
def test_few_classes_keep_those_classes_relabelled_in_order(classes: list[int]) -> None:
    data = indexed_data((4,) * 10, test_per_class=3)
    out = apply_setting(data, "few_classes", {"classes": classes}, seed=0)
    truth = data.train_labels[source_index(out)]
    assert out.classes == tuple(f"c{c}" for c in classes) and len(out.train_labels) == 4 * len(classes)
    for new, old in enumerate(classes):
        assert torch.equal(out.train_labels[truth == old], torch.full((4,), new))
    assert torch.bincount(out.test_labels).tolist() == [3] * len(classes)
    assert set(out.test_labels.tolist()) == set(range(len(classes)))


def test_few_classes_default_and_refusals() -> None:
    data = indexed_data((4,) * 10)
    assert apply_setting(data, "few_classes", {}, seed=0).classes == ("c0", "c6")
    with pytest.raises(KdkitError, match="out of range"):
        apply_setting(data, "few_classes", {"classes": [0, 10]}, seed=0)
    with pytest.raises(KdkitError, match="repeats"):
        apply_setting(data, "few_classes", {"classes": [3, 3]}, seed=0)
    with pytest.raises(KdkitError, match="classes"):
        apply_setting(data, "few_classes", {"classes": [3]}, seed=0)


# -- pruned -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("keep", "kept"), [(0.5, 50), (0.25, 25), (0.333, 33), (1.0, 100), (0.001, 1)])
def test_random_pruning_keeps_the_fraction(keep: float, kept: int) -> None:
    data = indexed_data((50, 50))
    out = apply_setting(data, "pruned", {"keep": keep}, seed=0)
    assert len(out.train_labels) == kept and torch.equal(data.train_labels[source_index(out)], out.train_labels)
    assert torch.equal(out.train_images, apply_setting(data, "pruned", {"keep": keep}, seed=0).train_images)


def test_teacher_margin_and_score_based_pruning_on_hand_checked_logits() -> None:
    data = indexed_data((3, 3))
    # margins p(y) - max_other p: two classes, so p(y) - p(other) = tanh((z_y - z_o) / 2)
    logits = torch.tensor([[3.0, 0], [1, 0], [0, 2], [2, 0], [0, 0.5], [0, 4]])
    margin = teacher_margin(logits, data.train_labels)  # labels 0, 0, 0, 1, 1, 1: z_y - z_other = 3, 1, -2, -2, .5, 4
    torch.testing.assert_close(margin, torch.tanh(torch.tensor([3.0, 1, -2, -2, 0.5, 4], dtype=torch.float64) / 2))
    hardest = apply_setting(data, "pruned", {"keep": 0.5, "score": "teacher_margin"}, seed=0, teacher_logits=logits)
    assert source_index(hardest).tolist() == [2, 3, 4]  # margins -2, -2, 0.5 (ties: lower index first)
    easiest = apply_setting(data, "pruned", {"keep": 0.5, "score": "teacher_margin", "retain": "easiest"}, seed=0,
                            teacher_logits=logits)
    assert source_index(easiest).tolist() == [0, 1, 5]  # margins 3, 1, 4
    with pytest.raises(KdkitError, match="teacher"):
        apply_setting(data, "pruned", {"score": "teacher_margin"}, seed=0)


def test_class_balanced_pruning_keeps_each_class_share_by_the_same_rule() -> None:
    data = indexed_data((4, 2))  # labels 0, 0, 0, 0, 1, 1
    logits = torch.tensor([[5.0, 0], [4, 0], [3, 0], [2, 0], [0, 1], [0, 0.5]])  # class 0 is surer than class 1
    easiest = {"keep": 0.5, "score": "teacher_margin", "retain": "easiest"}
    overall = apply_setting(data, "pruned", easiest, seed=0, teacher_logits=logits)
    assert source_index(overall).tolist() == [0, 1, 2]  # all of class 0: the global ranking follows the score
    balanced = apply_setting(data, "pruned", {**easiest, "balance": "class"}, seed=0, teacher_logits=logits)
    assert source_index(balanced).tolist() == [0, 1, 4]  # 2 of class 0's 4, 1 of class 1's 2, each its easiest
    assert "per-class" in balanced.name and "within each class" in balanced.source
    hardest = apply_setting(data, "pruned", {**easiest, "retain": "hardest", "balance": "class"}, seed=0,
                            teacher_logits=logits)
    assert source_index(hardest).tolist() == [2, 3, 5]
    random = apply_setting(indexed_data((50, 30, 20)), "pruned", {"keep": 0.1, "balance": "class"}, seed=3)
    assert torch.bincount(random.train_labels).tolist() == [5, 3, 2]


# -- shifted ----------------------------------------------------------------------------------------------------------

def test_shifted_pool_is_disjoint_from_the_originals_and_unlabelled() -> None:
    data = load_dataset("digits")
    originals, pool = split_original_pool(len(data.train_labels), 0.5, seed=4)
    assert len(set(originals.tolist()) & set(pool.tolist())) == 0
    assert sorted(originals.tolist() + pool.tolist()) == list(range(len(data.train_labels)))
    out = apply_setting(data, "shifted", {"pool": 0.5}, seed=4)
    kept = apply_setting(data, "shifted", {"pool": 0.5, "part": "original"}, seed=4)
    assert out.num_labelled == 0 and len(out.train_labels) == len(pool)
    assert torch.equal(kept.train_images, data.train_images[originals])
    assert torch.equal(kept.train_labels, data.train_labels[originals])
    # the pool is the pool images under their corruptions: no image is an original (not even its own source)
    assert torch.equal(out.train_images, shifted_pool(data.train_images[pool], CORRUPTIONS, 3, seed=5)[0])
    changed = (out.train_images != data.train_images[pool]).flatten(1).any(1)
    assert bool(changed.all())
    originals_seen = {bytes(img.numpy()) for img in data.train_images[originals]}
    assert not any(bytes(img.numpy()) in originals_seen for img in out.train_images)
    assert torch.equal(out.train_images, apply_setting(data, "shifted", {"pool": 0.5}, seed=4).train_images)


def test_shifted_assigns_the_corruptions_in_equal_shares() -> None:
    images = load_dataset("digits").train_images[:101]
    _, kinds = shifted_pool(images, CORRUPTIONS, 2, seed=0)
    assert sorted(torch.bincount(kinds).tolist()) == [25, 25, 25, 26]
    one, _ = shifted_pool(images, ("contrast",), 3, seed=0)
    x = images.float() / 255
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    expected = ((x - mean) * 0.2 + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(one, expected)  # severity 3 contrast: (x - mean) * 0.2 + mean


# -- two_modalities ---------------------------------------------------------------------------------------------------

def test_two_modalities_appends_the_sobel_edge_channel() -> None:
    flat = torch.full((1, 1, 6, 6), 100, dtype=torch.uint8)
    step = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    step[..., 3:] = 255  # a vertical edge between columns 2 and 3
    images = torch.cat([flat, step])
    data = ImageData("edges", images, torch.tensor([0, 1]), images, torch.tensor([0, 1]), ("a", "b"), (0.5,), (0.2,),
                     "memory")
    out = apply_setting(data, "two_modalities", {}, seed=0)
    assert out.train_images.shape == (2, 2, 6, 6) and out.test_images.shape == (2, 2, 6, 6)
    assert torch.equal(out.train_images[:, :1], images) and len(out.mean) == len(out.std) == 2
    assert int(out.train_images[0, 1].max()) == 0  # a flat image has no edge
    # |gx| = 4 at the step (1 + 2 + 1), scaled by 255 / (4 sqrt 2): 180; zero away from it
    assert out.train_images[1, 1, :, 2:4].unique().tolist() == [180]
    assert int(out.train_images[1, 1, :, :2].max()) == 0 and int(out.train_images[1, 1, :, 4:].max()) == 0
    assert torch.equal(out.test_images, out.train_images)


# -- the registry -----------------------------------------------------------------------------------------------------

def test_every_setting_is_registered_and_bad_names_and_parameters_are_refused() -> None:
    assert SETTINGS.names() == ["class_incremental", "class_mismatch", "few_classes", "long_tailed", "novel_classes",
                                "pruned", "semi_supervised", "shifted", "two_modalities"]
    data = indexed_data((4, 4))
    with pytest.raises(KdkitError, match="unknown setting 'semi_supervize'") as err:
        apply_setting(data, "semi_supervize", {}, seed=0)
    assert err.value.choices[0] == "semi_supervised"
    with pytest.raises(KdkitError, match="no parameter 'labeled'"):
        apply_setting(data, "semi_supervised", {"labeled": 2}, seed=0)
    with pytest.raises(KdkitError, match="keep must be in \\(0, 1\\]"):
        apply_setting(data, "pruned", {"keep": 1.5}, seed=0)


def test_a_setting_refuses_data_that_is_already_unlabelled() -> None:
    data = apply_setting(indexed_data((10, 10)), "semi_supervised", {"labelled": 4}, seed=0)
    with pytest.raises(KdkitError, match="unlabelled training samples"):
        apply_setting(data, "long_tailed", {}, seed=0)
