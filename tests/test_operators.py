"""Forward operators: adjointness, pseudo-inverses, projections, noise, shapes, independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffguide.tasks.operators import (OPERATORS, AveragePooling, BicubicDownsampling, Blur, Grayscale, HeatEquation,
                             Inpainting, LinearOperator, MatrixOperator, PhaseRetrieval, box_mask, compose,
                             gaussian_kernel, make_operator, motion_kernel, random_mask, random_matrix)

SHAPE = (3, 16, 16)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_operators() -> dict[str, LinearOperator]:
    g = _gen(1)
    ops = {
        "inpaint_box": Inpainting(box_mask(SHAPE, 6, generator=g), SHAPE),
        "inpaint_random": Inpainting(random_mask(SHAPE, 0.7, g, per_channel=True), SHAPE),
        "sr_avg": AveragePooling(SHAPE, 2),
        "sr_bicubic_2": BicubicDownsampling(SHAPE, 2),
        "sr_bicubic_4": BicubicDownsampling(SHAPE, 4),
        "blur_gauss": Blur(SHAPE, gaussian_kernel(7, 1.2)),
        "blur_motion": Blur(SHAPE, motion_kernel(9, 0.7, g)),
        "grayscale": Grayscale(SHAPE),
        "grayscale_luma": Grayscale(SHAPE, (0.299, 0.587, 0.114)),
        "matrix_wide": MatrixOperator(random_matrix(5, 8, g)),
        "matrix_rank_deficient": MatrixOperator(random_matrix(6, 8, g, torch.tensor([2.0, 1.0, 1.0, 0.5, 0.0, 0.0]))),
    }
    ops["inpaint@sr_avg"] = compose(Inpainting(random_mask((3, 8, 8), 0.5, g), (3, 8, 8)), ops["sr_avg"])
    ops["grayscale@blur"] = ops["grayscale"] @ ops["blur_gauss"]
    ops["sr_bicubic@inpaint"] = ops["sr_bicubic_2"] @ ops["inpaint_box"]
    for boundary in ("reflect", "replicate", "valid"):
        ops[f"blur_{boundary}"] = Blur(SHAPE, motion_kernel(5, 0.7, g), boundary=boundary)
    for boundary in ("circular", "reflect", "replicate", "valid"):
        ops[f"sr_bicubic_{boundary}"] = BicubicDownsampling(SHAPE, 2, boundary=boundary)
    return ops


LINEAR = linear_operators()
EXACT_PINV = ["inpaint_box", "inpaint_random", "sr_avg", "sr_bicubic_2", "sr_bicubic_4", "grayscale",
              "grayscale_luma", "inpaint@sr_avg", "matrix_wide", "matrix_rank_deficient", "sr_bicubic_circular",
              "sr_bicubic_reflect", "sr_bicubic_replicate", "sr_bicubic_valid"]


@pytest.mark.parametrize("name", list(LINEAR))
def test_adjointness(name):
    op = LINEAR[name]
    g = _gen(2)
    x = torch.randn(3, *op.in_shape, generator=g, dtype=torch.float64)
    v = torch.randn(3, *op.out_shape, generator=g, dtype=torch.float64)
    lhs = (op.forward(x) * v).sum()
    rhs = (x * op.adjoint(v)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * float(op.forward(x).norm() * v.norm())
    assert op.is_linear and not op.is_blackbox


@pytest.mark.parametrize("name", EXACT_PINV)
def test_pinv_identities(name):
    """Penrose conditions A A^+ A = A and A^+ A A^+ = A^+, and A^+ y in range(A^T) (minimum norm)."""
    op = LINEAR[name]
    g = _gen(3)
    x = torch.randn(2, *op.in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(2, *op.out_shape, generator=g, dtype=torch.float64)
    ax = op.forward(x)
    assert torch.allclose(op.forward(op.pinv(ax)), ax, atol=1e-9)
    py = op.pinv(y)
    assert torch.allclose(op.pinv(op.forward(py)), py, atol=1e-9)
    assert op.project_null(py).abs().max() < 1e-9          # no null-space component


def test_blur_pinv_respects_cutoff():
    """For circular blur, A A^+ A differs from A only on frequencies below rcond * max|k̂|."""
    op = LINEAR["blur_gauss"]
    x = torch.randn(2, *SHAPE, generator=_gen(4), dtype=torch.float64)
    err = (op.forward(op.pinv(op.forward(x))) - op.forward(x)).norm()
    assert err <= op.rcond * x.norm() + 1e-9
    kept = (op.inverse_spectrum != 0).float().mean()
    assert 0 < kept < 1   # the Gaussian's spectrum decays below the cut-off at high frequencies


PROJECTION_TOL = {name: 1e-9 for name in EXACT_PINV} | {"blur_gauss": 1e-3, "blur_motion": 1e-3}


@pytest.mark.parametrize("name", list(PROJECTION_TOL))
def test_projection_onto_measurement_set(name):
    """A(project(x, y)) = y for y in range(A), and projecting twice changes nothing.

    Exact pseudo-inverses reach 1e-9; the spectral cut-off of blur leaves at most ``rcond ||x_true||``.
    """
    op = LINEAR[name]
    g = _gen(5)
    truth = torch.randn(2, *op.in_shape, generator=g, dtype=torch.float64)
    x = torch.randn(2, *op.in_shape, generator=g, dtype=torch.float64)
    y = op.forward(truth)
    p = op.project(x, y)
    tol = PROJECTION_TOL[name]
    assert (op.forward(p) - y).norm() <= tol * truth.norm()
    assert (op.project(p, y) - p).norm() <= tol * truth.norm()                      # idempotent


def test_conjugate_gradient_pinv_of_composition():
    """The CG pseudo-inverse of a composition fits consistent data and returns the minimum-norm solution."""
    op = LINEAR["sr_bicubic@inpaint"]
    g = _gen(11)
    truth = torch.randn(2, *op.in_shape, generator=g, dtype=torch.float64)
    y = op.forward(truth)
    x = op.pinv(y)
    assert (op.forward(x) - y).norm() <= 1e-6 * y.norm()
    inner_mask = op.inner.mask.bool().expand_as(x)
    assert x[~inner_mask].abs().max() < 1e-12          # nothing placed where the inner mask hides pixels


def test_inpainting_projection_sets_measured_pixels_exactly():
    op = LINEAR["inpaint_random"]
    x, y = torch.randn(2, 2, *SHAPE, generator=_gen(6))
    p = op.project(x, op.forward(y))
    m = op.mask.bool().expand(2, *SHAPE)
    assert torch.equal(p[m], y[m]) and torch.equal(p[~m], x[~m])


def test_masks_are_binary_with_requested_size():
    box = box_mask((1, 16, 16), (5, 7), generator=_gen(0), margin=2)
    assert set(box.unique().tolist()) == {0.0, 1.0} and int((box == 0).sum()) == 35
    rnd = random_mask((3, 16, 16), 0.7, _gen(0))
    assert set(rnd.unique().tolist()) == {0.0, 1.0} and rnd.shape == (1, 16, 16)
    assert int((rnd == 0).sum()) == round(0.7 * 256)
    with pytest.raises(ValueError):
        Inpainting(torch.full((1, 16, 16), 0.5))
    with pytest.raises(ValueError):
        random_mask((1, 4, 4), 1.5)
    with pytest.raises(ValueError):
        box_mask((1, 8, 8), 9)


def test_bicubic_matches_torch_antialias():
    x = torch.randn(2, *SHAPE, generator=_gen(7), dtype=torch.float64)
    for factor in (2, 4):
        ref = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(BicubicDownsampling(SHAPE, factor).forward(x), ref, atol=1e-12)


def test_blur_is_circular_convolution():
    """Reference: direct circular convolution (flipped-kernel correlation with circular padding)."""
    kernel = motion_kernel(7, 0.8, _gen(8))
    op = Blur(SHAPE, kernel)
    x = torch.randn(2, *SHAPE, generator=_gen(9), dtype=torch.float64)
    weight = kernel.flip(0, 1)[None, None].expand(3, 1, 7, 7)
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="circular"), weight, groups=3)
    assert torch.allclose(op.forward(x), ref, atol=1e-12)
    assert math.isclose(float(kernel.sum()), 1.0) and float(kernel.min()) >= 0


def test_kernels():
    k = gaussian_kernel(21, 1.5)
    r = torch.arange(21, dtype=torch.float64) - 10
    assert math.isclose(float(k.sum()), 1.0) and torch.allclose(k, k.T)
    assert math.isclose(float((k.sum(1) * r**2).sum()), 1.5**2, rel_tol=1e-6)   # variance of a sampled Gaussian
    assert torch.equal(motion_kernel(9, 0.5, _gen(3)), motion_kernel(9, 0.5, _gen(3)))
    assert not torch.equal(motion_kernel(9, 0.5, _gen(3)), motion_kernel(9, 0.5, _gen(4)))


@pytest.mark.parametrize("name", ["sr_avg", "blur_gauss", "inpaint_random"])
def test_measurement_noise_statistics(name):
    sigma_y = 0.05
    op = make_operator(name, (1, 32, 32), sigma_y=sigma_y, generator=_gen(0))
    x = torch.randn(64, 1, 32, 32, generator=_gen(1), dtype=torch.float64)
    noise = op.measure(x, _gen(2)) - op.forward(x)
    if isinstance(op, Inpainting):
        measured = op.mask.bool().expand_as(noise)
        assert torch.equal(noise[~measured], torch.zeros_like(noise[~measured]))
        noise = noise[measured]
    n = noise.numel()
    assert abs(float(noise.mean())) < 4 * sigma_y / math.sqrt(n)
    assert abs(float(noise.std()) - sigma_y) < 4 * sigma_y / math.sqrt(2 * n)
    assert torch.equal(op.measure(x, _gen(2)), op.measure(x, _gen(2)))              # seeded
    assert not torch.equal(op.measure(x, _gen(2)), op.measure(x, _gen(3)))


def test_shape_mismatches_raise():
    op = AveragePooling((1, 16, 16), 2)
    with pytest.raises(ValueError):
        op.forward(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError):
        op.adjoint(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError):
        op.pinv(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError):
        AveragePooling((1, 15, 16), 2)
    with pytest.raises(ValueError):
        Inpainting(torch.ones(1, 8, 8), (1, 16, 16))
    with pytest.raises(ValueError):
        Blur((1, 16, 16), torch.ones(4, 4) / 16)
    with pytest.raises(ValueError):
        compose(AveragePooling((1, 16, 16), 2), AveragePooling((1, 16, 16), 2))
    with pytest.raises(TypeError):
        op.forward(torch.zeros(1, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError):
        make_operator("nope", (1, 16, 16))
    with pytest.raises(ValueError):
        AveragePooling((1, 16, 16), 2, sigma_y=-0.1)


def test_registry_builds_every_operator():
    x = torch.zeros(2, 1, 16, 16)
    for name in OPERATORS:
        op = make_operator(name, (1, 16, 16), sigma_y=0.01, generator=_gen(0))
        assert op.forward(x).shape == (2, *op.out_shape)


def test_phase_retrieval_matches_numpy_and_has_finite_gradient():
    op = PhaseRetrieval((1, 8, 8), oversample=2.0)
    x = torch.randn(2, 1, 8, 8, generator=_gen(10), dtype=torch.float64)
    ref = np.abs(np.fft.fft2(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2))), norm="ortho"))
    assert np.allclose(op.forward(x).numpy(), ref, atol=1e-7)
    assert torch.allclose(op.forward(-x), op.forward(x)) and not op.is_linear
    z = torch.zeros(1, 1, 8, 8, requires_grad=True)
    op.forward(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_heat_equation_blackbox():
    """Fourier mode k decays by (1 - 4 kappa dt sin^2(pi k / W))^n per explicit step; gradients are refused."""
    op = HeatEquation((1, 16, 16), kappa=1.0, dt=0.2, num_steps=5, stride=1)
    k = 3
    col = torch.cos(2 * math.pi * k * torch.arange(16, dtype=torch.float64) / 16)
    x = col.expand(16, 16)[None, None].clone()
    factor = (1 - 4 * 0.2 * math.sin(math.pi * k / 16) ** 2) ** 5
    assert torch.allclose(op.forward(x), factor * x, atol=1e-12)
    assert op.is_blackbox and not op.is_linear
    with pytest.raises(TypeError, match="EnKG"):
        op.forward(torch.zeros(1, 1, 16, 16, requires_grad=True))
    with torch.no_grad():
        assert op.forward(torch.zeros(1, 1, 16, 16, requires_grad=True)).shape == (1, 1, 16, 16)
    sub = HeatEquation((1, 16, 16), stride=2, reaction=1.0)
    assert sub.out_shape == (1, 8, 8) and (sub @ AveragePooling((1, 32, 32), 2)).is_blackbox
    with pytest.raises(ValueError):
        HeatEquation((1, 16, 16), kappa=1.0, dt=0.3)


@pytest.mark.parametrize("name", ["inpaint_random", "blur_gauss", "sr_avg", "matrix_wide", "inpaint@sr_avg"])
def test_prox_l2_solves_the_normal_equations(name):
    """``(A^T A + w I) x = A^T y + w z`` for the closed forms (inpainting, blur) and conjugate gradients."""
    op = LINEAR[name]
    g = _gen(12)
    z = torch.randn(2, *op.in_shape, generator=g, dtype=torch.float64)
    y = torch.randn(2, *op.out_shape, generator=g, dtype=torch.float64)
    x = op.prox_l2(z, y, 0.3)
    lhs = op.adjoint(op.forward(x)) + 0.3 * x
    assert torch.allclose(lhs, op.adjoint(y) + 0.3 * z, atol=1e-9)
    with pytest.raises(ValueError):
        op.prox_l2(z, y, 0.0)


# ------------------------------------------------------------------------------------------------- SVD view
SMALL = (2, 8, 8)


def svd_operators() -> dict[str, LinearOperator]:
    g = _gen(20)
    return {
        "inpaint": Inpainting(random_mask(SMALL, 0.5, g, per_channel=True), SMALL),
        "sr_avg": AveragePooling(SMALL, 2),
        "sr_avg_4": AveragePooling(SMALL, 4),
        "sr_bicubic": BicubicDownsampling(SMALL, 2),
        "sr_bicubic_4_reflect": BicubicDownsampling(SMALL, 4, boundary="reflect"),
        "sr_bicubic_valid": BicubicDownsampling((1, 16, 16), 2, boundary="valid"),
        "grayscale": Grayscale((3, 4, 4), (0.299, 0.587, 0.114)),
        "grayscale_1ch": Grayscale((1, 4, 4)),
        "blur_gauss": Blur(SMALL, gaussian_kernel(5, 1.0)),
        "blur_motion": Blur((1, 8, 6), motion_kernel(5, 0.7, g)),
        "matrix_wide": MatrixOperator(random_matrix(3, 5, g)),
        "matrix_tall": MatrixOperator(random_matrix(6, 4, g)),
    }


def _dense(fn, shape) -> torch.Tensor:
    """The matrix of a linear map of ``(B, *shape)`` tensors, columns = images of the basis vectors."""
    n = math.prod(shape)
    return fn(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1).T


@pytest.mark.parametrize("name", list(svd_operators()))
def test_svd_view_is_exact_against_the_dense_matrix(name):
    """``A = U diag(s) V^T`` with orthogonal ``V``, orthonormal ``U`` columns on ``s > 0``, ``U^T`` the transpose of
    ``U`` there, singular values equal to ``linalg.svdvals(A)``, and ``V(U^T y / s) = pinv(A) y``."""
    op = svd_operators()[name]
    assert op.has_svd
    a, v, u = _dense(op.forward, op.in_shape), _dense(op.V, op.in_shape), _dense(op.U, op.in_shape)
    u_t = _dense(op.U_adjoint, op.out_shape)
    s = op.singular_values.flatten()
    eye = torch.eye(v.shape[0], dtype=torch.float64)
    assert torch.allclose(v.T @ v, eye, atol=1e-12)
    assert torch.allclose(_dense(op.V_adjoint, op.in_shape), v.T, atol=1e-12)
    measured = s > 0
    assert torch.allclose(u[:, measured].T @ u[:, measured], eye[measured][:, measured], atol=1e-12)
    assert torch.allclose(u_t, (u * measured).T, atol=1e-12)
    assert torch.allclose(a, u @ torch.diag(s) @ v.T, atol=1e-12)
    reference = torch.linalg.svdvals(a)
    assert torch.allclose(s.sort(descending=True).values[:len(reference)], reference, atol=1e-10)
    y = torch.randn(2, *op.out_shape, generator=_gen(21), dtype=torch.float64)
    pinv = torch.linalg.pinv(a, rtol=1e-10)
    assert torch.allclose(op.svd_pinv(y).reshape(2, -1), y.reshape(2, -1) @ pinv.T, atol=1e-8)


def test_non_circular_blur_has_no_svd():
    op = Blur(SMALL, gaussian_kernel(3, 1.0), boundary="reflect")
    assert not op.has_svd
    with pytest.raises(ValueError, match="circular"):
        op.V_adjoint(torch.zeros(1, *SMALL))


@pytest.mark.parametrize("boundary,mode", [("circular", "wrap"), ("reflect", "mirror"), ("replicate", "nearest"),
                                           ("valid", None)])
def test_blur_boundaries_match_scipy(boundary, mode):
    """scipy.ndimage.convolve (``wrap`` / ``mirror`` / ``nearest``) and scipy.signal.convolve2d(``valid``)."""
    from scipy import ndimage, signal

    kernel = motion_kernel(5, 0.8, _gen(22))
    op = Blur((1, 9, 8), kernel, boundary=boundary)
    x = torch.randn(2, 1, 9, 8, generator=_gen(23), dtype=torch.float64)
    k = kernel.numpy()
    ref = [signal.convolve2d(img[0], k, mode="valid") if mode is None else ndimage.convolve(img[0], k, mode=mode)
           for img in x.numpy()]
    assert torch.allclose(op.forward(x)[:, 0], torch.from_numpy(np.stack(ref)), atol=1e-12)
    assert op.out_shape == ((1, 5, 4) if boundary == "valid" else (1, 9, 8))


@pytest.mark.parametrize("boundary,mode", [("circular", "wrap"), ("reflect", "reflect"), ("replicate", "edge")])
def test_bicubic_boundaries_match_padded_resampling(boundary, mode):
    """Reference: pad with ``np.pad(mode)`` and apply the stretched Keys kernel (a = -0.5) at every output centre."""
    factor, size = 2, 12
    x = torch.randn(1, 1, size, size, generator=_gen(24), dtype=torch.float64)
    pad = 2 * factor + 2
    img = np.pad(x[0, 0].numpy(), pad, mode=mode)

    def weights(i):
        center = factor * (i + 0.5) + pad
        taps = np.arange(math.floor(center - 2 * factor + 0.5), math.floor(center + 2 * factor + 0.5))
        s = np.abs((taps - center + 0.5) / factor)
        w = np.where(s <= 1, 1.5 * s**3 - 2.5 * s**2 + 1, np.where(s < 2, -0.5 * s**3 + 2.5 * s**2 - 4 * s + 2, 0))
        return taps, w / w.sum()

    ref = np.zeros((size // factor, size // factor))
    for i in range(size // factor):
        ti, wi = weights(i)
        for j in range(size // factor):
            tj, wj = weights(j)
            ref[i, j] = wi @ img[np.ix_(ti, tj)] @ wj
    out = BicubicDownsampling((1, size, size), factor, boundary=boundary).forward(x)[0, 0]
    assert np.allclose(out.numpy(), ref, atol=1e-12)


def test_bicubic_valid_keeps_only_inside_windows():
    op = BicubicDownsampling((1, 16, 16), 2, boundary="valid")
    full = BicubicDownsampling((1, 16, 16), 2, boundary="replicate")
    x = torch.randn(1, 1, 16, 16, generator=_gen(25), dtype=torch.float64)
    assert op.out_shape == (1, 4, 4)        # 8 outputs; the kernel spans 8 taps, so two at each end reach outside
    assert torch.allclose(op.forward(x), full.forward(x)[..., 2:-2, 2:-2], atol=1e-12)
    with pytest.raises(ValueError, match="boundary"):
        BicubicDownsampling((1, 16, 16), 2, boundary="zeros")
    with pytest.raises(ValueError, match="boundary"):
        Blur((1, 8, 8), gaussian_kernel(3, 1.0), boundary="zeros")


# ------------------------------------------------------------------------------------------------- Poisson noise
def test_poisson_noise_statistics():
    """``y = 2 gain Poisson(I / gain) - 1`` with ``I = (A x + 1) / 2``: mean ``A x``, variance ``4 gain I``."""
    gain = 0.02
    op = make_operator("sr_avg", (1, 8, 8), generator=_gen(0), poisson_gain=gain)
    assert op.sigma_y == pytest.approx(math.sqrt(2 * gain)) and "Poisson" in repr(op)
    x = torch.rand(1, 1, 8, 8, generator=_gen(1), dtype=torch.float64) * 1.6 - 0.8
    n = 4000
    ys = op.measure(x.expand(n, -1, -1, -1), _gen(2))
    clean = op.forward(x)[0]
    intensity = (clean + 1) / 2
    se = (4 * gain * intensity / n).sqrt()
    assert ((ys.mean(0) - clean).abs() < 4.5 * se).all()
    assert ((ys.var(0) / (4 * gain * intensity) - 1).abs() < 4.5 * math.sqrt(2 / n)).all()
    assert torch.equal(op.measure(x, _gen(3)), op.measure(x, _gen(3)))
    counts = (ys + 1) / (2 * gain)
    assert torch.allclose(counts, counts.round(), atol=1e-9)                        # integer photon counts
    inpaint = make_operator("inpaint_random", (1, 8, 8), generator=_gen(0), poisson_gain=gain)
    noisy = inpaint.measure(x, _gen(4))
    measured_counts = (noisy[inpaint.mask.bool()[None]] + 1) / (2 * gain)
    assert torch.allclose(measured_counts, measured_counts.round(), atol=1e-9)
    assert (noisy[~inpaint.mask.bool()[None]] == 0).all()                           # unmeasured stay 0
    with pytest.raises(ValueError, match="gain"):
        make_operator("sr_avg", (1, 8, 8), poisson_gain=0.0)
