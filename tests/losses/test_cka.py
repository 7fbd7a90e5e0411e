"""CKA, feature CKA loss and RCKA against an HSIC computation with the centring matrix, plus invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.losses.cka import CKALoss, RCKALoss, _use_gram_form, cka, cka_loss, rcka_loss


def hsic_cka(x: np.ndarray, y: np.ndarray, centered: bool = True) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XX^T, L = YY^T and H = I - 11^T/N."""
    n = x.shape[0]
    x, y = x.reshape(n, -1), y.reshape(n, -1)
    k = np.array([[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)])
    ll = np.array([[float(np.dot(y[i], y[j])) for j in range(n)] for i in range(n)])
    h = np.eye(n) - np.ones((n, n)) / n if centered else np.eye(n)

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, ll) / np.sqrt(hsic(k, k) * hsic(ll, ll))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(p: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize(("n", "p", "q"), [(8, 3, 5), (6, 40, 30), (10, 10, 10)])
def test_cka_matches_hsic_reference(centered: bool, n: int, p: int, q: int) -> None:
    x = torch.randn(n, p, generator=gen(0), dtype=torch.float64)
    y = torch.randn(n, q, generator=gen(1), dtype=torch.float64) + 0.5 * x[:, :1]
    got = cka(x, y, centered)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hsic_cka(x.numpy(), y.numpy(), centered), rel=1e-9)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize(("n", "p", "q"), [(7, 3, 4), (5, 50, 20), (12, 12, 2)])
def test_gram_and_feature_forms_agree(centered: bool, n: int, p: int, q: int) -> None:
    x, y = torch.randn(n, p, generator=gen(2)), torch.randn(n, q, generator=gen(3))
    gram = cka(x, y, centered, form="gram")
    feature = cka(x, y, centered, form="feature")
    assert gram.item() == pytest.approx(feature.item(), rel=1e-5, abs=1e-7)
    assert cka(x, y, centered).item() == pytest.approx(gram.item(), rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="form"):
        cka(x, y, form="both")  # type: ignore[arg-type]


def test_form_choice_follows_cost() -> None:
    assert _use_gram_form(64, 65536, 16384)  # wide feature maps: N x N Grams
    assert not _use_gram_form(1024, 8, 8)  # narrow features, big batch: P x P'
    assert _use_gram_form(64, 100, 100)  # CIFAR logits with batch 64


def test_cka_flattens_higher_dims() -> None:
    x, y = torch.randn(6, 2, 3, 3, generator=gen(4)), torch.randn(6, 5, 2, generator=gen(5))
    assert cka(x, y).item() == pytest.approx(cka(x.reshape(6, -1), y.reshape(6, -1)).item(), rel=1e-6)


@pytest.mark.parametrize("centered", [True, False])
def test_cka_one_at_identity_and_invariances(centered: bool) -> None:
    x = torch.randn(10, 6, generator=gen(6), dtype=torch.float64)
    y = torch.randn(10, 4, generator=gen(7), dtype=torch.float64) + x[:, :4]
    base = cka(x, y, centered).item()
    assert cka(x, x.clone(), centered).item() == pytest.approx(1.0, abs=1e-9)
    assert cka(x, x @ orthogonal(6), centered).item() == pytest.approx(1.0, abs=1e-9)
    assert cka(x @ orthogonal(6), y, centered).item() == pytest.approx(base, rel=1e-9)
    assert cka(x, y @ orthogonal(4, seed=2), centered).item() == pytest.approx(base, rel=1e-9)
    assert cka(3.7 * x, y, centered).item() == pytest.approx(base, rel=1e-9)
    assert cka(x, 1e-3 * y, centered).item() == pytest.approx(base, rel=1e-9)
    perm = torch.randperm(10, generator=gen(8))
    assert cka(x[perm], y[perm], centered).item() == pytest.approx(base, rel=1e-9)
    assert 0.0 <= base <= 1.0


def test_centred_cka_invariant_to_row_shift_uncentred_not() -> None:
    x = torch.randn(10, 6, generator=gen(9), dtype=torch.float64)
    y = torch.randn(10, 4, generator=gen(10), dtype=torch.float64) + x[:, :4]
    shift = torch.randn(1, 6, generator=gen(11), dtype=torch.float64) * 5
    assert cka(x + shift, y).item() == pytest.approx(cka(x, y).item(), rel=1e-9)
    assert abs(cka(x + shift, y, centered=False).item() - cka(x, y, centered=False).item()) > 1e-3


def test_cka_of_independent_random_matrices_is_small() -> None:
    x, y = torch.randn(500, 4, generator=gen(12)), torch.randn(500, 4, generator=gen(13))
    assert cka(x, y).item() < 0.05


def test_cka_constant_input_is_zero_not_nan() -> None:
    x = torch.ones(5, 3, requires_grad=True)
    y = torch.randn(5, 4, generator=gen(14))
    c = cka(x, y)
    c.backward()
    assert c.item() == 0.0 and torch.isfinite(x.grad).all()


def test_cka_loss_zero_at_identity_and_finite_gradients() -> None:
    f = torch.randn(8, 4, 5, 5, generator=gen(15))
    assert cka_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-5)
    s = torch.randn(8, 3, 5, 5, generator=gen(16), requires_grad=True)
    loss = cka_loss(s, f)
    loss.backward()
    assert 0.0 < loss.item() < 1.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_cka_loss_bfloat16() -> None:
    s, t = torch.randn(8, 20, generator=gen(17)), torch.randn(8, 30, generator=gen(18))
    got = cka_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(cka_loss(s, t).item(), abs=0.02)


def test_cka_module() -> None:
    s, t = torch.randn(6, 3, 4, 4, generator=gen(19)), torch.randn(6, 7, 2, 2, generator=gen(20))
    labels = torch.zeros(6, dtype=torch.long)
    assert CKALoss()(s, t, labels).item() == pytest.approx(cka_loss(s, t).item())
    assert CKALoss(centered=False)(s, t, labels).item() == pytest.approx(cka_loss(s, t, centered=False).item())
    assert CKALoss().check_shapes((3, 4, 4), (7, 2, 2)) is None
    assert (CKALoss.default_student_tap, CKALoss.default_teacher_tap) == ("stage2", "stage2")


# --------------------------------------------------------------------------------------------------- RCKA


def rcka_reference(z_s: np.ndarray, z_t: np.ndarray, w_intra: float, w_inter: float, centered: bool) -> float:
    intra = 1 - hsic_cka(z_s, z_t, centered)
    inter = 1 - hsic_cka(z_s.T.copy(), z_t.T.copy(), centered)
    return w_intra * intra + w_inter * inter


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize(("w_intra", "w_inter"), [(15.0, 15.0), (2.0, 0.5), (1.0, 0.0)])
def test_rcka_matches_reference(centered: bool, w_intra: float, w_inter: float) -> None:
    z_s = torch.randn(6, 5, generator=gen(21), dtype=torch.float64)
    z_t = torch.randn(6, 5, generator=gen(22), dtype=torch.float64) * 2 + z_s
    got = rcka_loss(z_s, z_t, w_intra, w_inter, centered).item()
    assert got == pytest.approx(rcka_reference(z_s.numpy(), z_t.numpy(), w_intra, w_inter, centered), rel=1e-9)


def test_rcka_code_compat_drops_centring_and_weights_inter_by_intra() -> None:
    z_s = torch.randn(6, 5, generator=gen(23), dtype=torch.float64)
    z_t = torch.randn(6, 5, generator=gen(24), dtype=torch.float64) + z_s
    got = rcka_loss(z_s, z_t, intra_weight=2.0, inter_weight=7.0, centered=True, code_compat=True).item()
    assert got == pytest.approx(rcka_reference(z_s.numpy(), z_t.numpy(), 2.0, 2.0, centered=False), rel=1e-9)
    off = rcka_loss(z_s, z_t, intra_weight=2.0, inter_weight=0.0, code_compat=True).item()
    assert off == pytest.approx(rcka_reference(z_s.numpy(), z_t.numpy(), 2.0, 0.0, centered=False), rel=1e-9)


def test_rcka_temperature_softens_only_the_intra_term() -> None:
    z_s = torch.randn(6, 5, generator=gen(25), dtype=torch.float64)
    z_t = torch.randn(6, 5, generator=gen(26), dtype=torch.float64)
    p_s, p_t = torch.softmax(z_s / 4, dim=1), torch.softmax(z_t / 4, dim=1)
    expected = 3 * (1 - hsic_cka(p_s.numpy(), p_t.numpy())) + 5 * (1 - hsic_cka(z_s.T.numpy(), z_t.T.numpy()))
    assert rcka_loss(z_s, z_t, 3.0, 5.0, temperature=4.0).item() == pytest.approx(expected, rel=1e-9)


def test_rcka_gram_row_norm_matches_loop_reference() -> None:
    z_s = torch.randn(5, 4, generator=gen(27), dtype=torch.float64)
    z_t = torch.randn(5, 4, generator=gen(28), dtype=torch.float64)

    def row_normed(x: np.ndarray, y: np.ndarray) -> float:
        n = x.shape[0]
        k = np.array([[x[i] @ x[j] / np.sqrt(x[i] @ x[i]) for j in range(n)] for i in range(n)])
        ll = np.array([[y[i] @ y[j] / np.sqrt(y[i] @ y[i]) for j in range(n)] for i in range(n)])
        return float(np.sum(k * ll) / np.sqrt(np.sum(k * k) * np.sum(ll * ll)))

    s, t = z_s.numpy(), z_t.numpy()
    expected = 15 * (1 - row_normed(s, t)) + 15 * (1 - row_normed(s.T.copy(), t.T.copy()))
    got = rcka_loss(z_s, z_t, code_compat=True, gram_row_norm=True).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_rcka_zero_at_identity_and_invariant_to_batch_permutation() -> None:
    z = torch.randn(16, 10, generator=gen(29))
    assert rcka_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-4)
    z_t = torch.randn(16, 10, generator=gen(30))
    perm = torch.randperm(16, generator=gen(31))
    assert rcka_loss(z[perm], z_t[perm]).item() == pytest.approx(rcka_loss(z, z_t).item(), rel=1e-5)


def test_rcka_gradients_finite_with_saturated_teacher() -> None:
    z_s = torch.randn(8, 10, generator=gen(32), requires_grad=True)
    z_t = torch.zeros(8, 10)
    z_t[torch.arange(8), torch.arange(8) % 10] = 1e4  # one-hot teacher
    for temperature in (None, 1.0):
        z_s.grad = None
        loss = rcka_loss(z_s, z_t, temperature=temperature)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_rcka_bfloat16() -> None:
    z_s, z_t = torch.randn(16, 10, generator=gen(33)), torch.randn(16, 10, generator=gen(34))
    got = rcka_loss(z_s.bfloat16(), z_t.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    assert got.float().item() == pytest.approx(rcka_loss(z_s, z_t).item(), rel=0.02)


def test_rcka_module_shapes_and_bad_params() -> None:
    z_s, z_t = torch.randn(8, 10, generator=gen(35)), torch.randn(8, 10, generator=gen(36))
    labels = torch.zeros(8, dtype=torch.long)
    module = RCKALoss(intra_weight=2.0, inter_weight=3.0, temperature=2.0)
    assert module(z_s, z_t, labels).item() == pytest.approx(rcka_loss(z_s, z_t, 2.0, 3.0, temperature=2.0).item())
    assert RCKALoss().check_shapes((10,), (10,)) is None
    assert "inter_weight: 0" in (RCKALoss().check_shapes((10,), (12,)) or "")
    assert RCKALoss(inter_weight=0).check_shapes((10,), (12,)) is None
    with pytest.raises(ValueError, match="same number of classes"):
        rcka_loss(z_s, torch.randn(8, 12))
    for bad in ({"intra_weight": -1.0}, {"intra_weight": 0.0, "inter_weight": 0.0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            RCKALoss(**bad)  # type: ignore[arg-type]
