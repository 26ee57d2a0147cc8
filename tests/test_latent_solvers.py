"""Latent solvers (latent DPS, PSLD, P2L) on a toy linear "VAE" and a tiny diffusers pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffguide.guidance import DPS, P2L, PSLD
from diffguide.guidance.latent import vae_decoder, vae_encoder
from diffguide.samplers import diffusers_model_fn, plan_from_scheduler, sample_inverse
from diffguide.tasks.operators import Inpainting, MatrixOperator, box_mask, random_matrix
from tiny_pipes import tiny_sd

F64 = torch.float64
IMAGE, LATENT, MEAS = 6, 3, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plan(steps: int):
    return plan_from_scheduler(DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                                             clip_sample=False), steps)


@pytest.fixture
def toy():
    """Linear VAE ``D(z) = W z``, ``E = W^+`` and a conditional x0-predictor whose output the embedding shifts."""
    g = _gen(0)
    W = torch.randn(IMAGE, LATENT, generator=g, dtype=F64)
    W_pinv = torch.linalg.pinv(W)
    decode = lambda z: z @ W.T
    encode = lambda x: x @ W_pinv.T
    mix = torch.randn(LATENT, LATENT, generator=g, dtype=F64) * 0.3

    def model_fn(z, t, emb):                 # x0 prediction: shrink towards an embedding-dependent mean
        return 0.5 * z + emb[:, 0, :LATENT] + torch.tanh(z) @ mix

    A = random_matrix(MEAS, IMAGE, g, singular_values=torch.ones(MEAS))   # orthonormal rows
    truth = torch.randn(2, LATENT, generator=g, dtype=F64)
    op = MatrixOperator(A, sigma_y=0.05)
    y = op.forward(decode(truth))
    embedding = torch.zeros(1, 4, 5, dtype=F64)
    return dict(W=W, decode=decode, encode=encode, model_fn=model_fn, op=op, y=y, embedding=embedding)


def test_encoder_range_projection_is_idempotent(toy):
    p2l = P2L(toy["op"], toy["y"], toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"],
              prediction_type="sample")
    z = torch.randn(2, LATENT, generator=_gen(1), dtype=F64)
    once = p2l.project_latent(z)
    assert torch.allclose(p2l.project_latent(once), once, atol=1e-12)
    # with a tall W every latent is in the encoder's range: E(D(z)) = z
    assert torch.allclose(once, z, atol=1e-12)
    prox = P2L(toy["op"], toy["y"], toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"],
               prediction_type="sample", prox_weight=0.1)
    moved = prox.project_latent(z)
    misfit = lambda lat: ((toy["op"].forward(toy["decode"](lat)) - toy["y"]) ** 2).sum()
    assert misfit(moved) < misfit(z)


def test_psld_gluing_lands_on_the_measurement_set(toy):
    psld = PSLD(toy["op"], toy["y"], toy["decode"], toy["encode"], scale=1.0, gluing=0.1)
    image = torch.randn(2, IMAGE, generator=_gen(2), dtype=F64)
    glued = psld.glue(image)
    A = toy["op"].matrix
    assert torch.allclose(glued @ A.T, toy["y"], atol=1e-12)
    # orthonormal rows: A^+ = A^T, so this is PSLD's own A^T y + (I - A^T A) x
    assert torch.allclose(glued, toy["y"] @ A + image - image @ A.T @ A, atol=1e-12)
    shape = (1, 4, 4)
    op = Inpainting(box_mask(shape, 2, top_left=(0, 1)), shape)
    y = op.forward(torch.randn(1, *shape, generator=_gen(3)))
    x = torch.randn(3, *shape, generator=_gen(4))
    glued = PSLD(op, y, lambda z: z, lambda x: x).glue(x)
    assert torch.equal(op.forward(glued), y.expand(3, *shape))


def test_prompt_tuning_gradient_is_nonzero_and_lowers_the_measurement_loss(toy):
    p2l = P2L(toy["op"], toy["y"], toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"],
              prediction_type="sample", prompt_steps=25, prompt_lr=0.05, project_every=0)
    plan = _plan(10)
    z = torch.randn(2, LATENT, generator=_gen(5), dtype=F64)
    p2l.reset()
    p2l.prepare(None, z, plan, 3)
    assert p2l.embedding.shape == (2, 4, 5)
    assert p2l.embedding.detach().abs().sum() > 0                             # the gradient reached the embedding
    assert torch.equal(p2l.embedding.detach()[:, 1:], torch.zeros(2, 3, 5, dtype=F64))   # ...only where it acts
    losses = p2l.prompt_losses
    assert losses[-1] < 0.5 * losses[0]
    assert p2l.stats.gradient_calls == 25 * 2


def test_p2l_without_tuning_or_projection_is_latent_dps(toy):
    plan = _plan(8)
    z = torch.randn(3, LATENT, generator=_gen(6), dtype=F64)
    y = toy["y"][:1]
    p2l = P2L(toy["op"], y, toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"],
              prediction_type="sample", scale=0.3, prompt_steps=0, project_every=0)
    ours = sample_inverse(None, z, plan, p2l, eta=1.0, generator=_gen(7), disable=True)
    model = lambda x, level: toy["model_fn"](x, level.t, toy["embedding"].expand(x.shape[0], 4, 5))
    ref = sample_inverse(model, z, plan, DPS(toy["op"], y, scale=0.3, decode=toy["decode"]), eta=1.0,
                         generator=_gen(7), disable=True)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_p2l_runs_on_a_diffusers_latent_pipeline():
    pipe = tiny_sd(seed=0)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    decode, encode = vae_decoder(pipe.vae), vae_encoder(pipe.vae)
    shape = (3, 16, 16)
    op = Inpainting(box_mask(shape, 6, top_left=(5, 5)), shape, sigma_y=0.05)
    y = op.measure(torch.rand(1, *shape, generator=_gen(8)) * 2 - 1, _gen(9))
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = pipe.text_encoder(ids)[0]
    p2l = P2L(op, y, diffusers_model_fn(pipe.unet), embedding, decode, encode, scale=0.5, prompt_steps=2,
              prompt_lr=1e-2, project_every=2)
    plan = plan_from_scheduler(pipe.scheduler, 4)
    z = torch.randn(2, 4, 8, 8, generator=_gen(10))
    out = sample_inverse(None, z, plan, p2l, disable=True)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert not torch.equal(p2l.embedding.detach()[0], embedding[0])
    assert p2l.stats.gradient_calls == 4 * 2 * (2 + 1)


def test_latent_solver_arguments_are_validated(toy):
    with pytest.raises(ValueError, match="decode"):
        PSLD(toy["op"], toy["y"], None)
    with pytest.raises(ValueError, match="encode"):
        PSLD(toy["op"], toy["y"], toy["decode"], None, gluing=0.1)
    with pytest.raises(ValueError):
        P2L(toy["op"], toy["y"], toy["model_fn"], torch.zeros(4, 5), toy["decode"], toy["encode"])
    with pytest.raises(ValueError):
        P2L(toy["op"], toy["y"], toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"], prompt_steps=-1)
    with pytest.raises(ValueError):
        P2L(toy["op"], toy["y"], toy["model_fn"], toy["embedding"], toy["decode"], toy["encode"], prompt_lr=0.0)


@pytest.mark.parametrize("omega,gamma", [(0.0, 0.1), (0.3, 0.1), (0.3, 0.0)])
def test_psld_step_is_the_official_weighted_sum(toy, omega, gamma):
    """Official ``p_sample_ddim``: ``error = inpaint_error * gamma + meas_error * omega``, ``z_prev -= grad error``
    (so omega = 0 still glues); here per sample, with ``A^T`` for the orthonormal-row ``A``."""
    from diffguide.samplers.inverse import Transition, ddim_move, level_at

    plan = _plan(10)
    z = torch.randn(2, LATENT, generator=_gen(11), dtype=F64, requires_grad=True)
    level = level_at(plan, 3, z)
    x0_hat = toy["model_fn"](z, level.t, toy["embedding"].expand(2, 4, 5))
    alpha_next, sigma_next = plan.alpha(4).to(F64), plan.sigma_vp(4).to(F64)
    x_next, eps_hat, weight = ddim_move(z, x0_hat, level.alpha, level.sigma, alpha_next, sigma_next, 0.0, None)
    A, y = toy["op"].matrix, toy["y"]
    image = toy["decode"](x0_hat)
    meas_error = (image @ A.T - y).norm(dim=1)
    glued = y @ A + image - image @ A.T @ A                       # A^T y + (I - A^T A) D(z0)
    inpaint_error = (toy["encode"](glued) - x0_hat).norm(dim=1)
    (grad,) = torch.autograd.grad((inpaint_error * gamma + meas_error * omega).sum(), z, retain_graph=True)
    psld = PSLD(toy["op"], toy["y"], toy["decode"], toy["encode"], scale=omega, gluing=gamma)
    ours = psld.correct(Transition(z, x0_hat, eps_hat, x_next, level, alpha_next, sigma_next, weight))
    assert torch.allclose(ours, x_next.detach() - grad, atol=1e-12)
    if omega == 0.0:
        assert grad.abs().max() > 1e-3                            # the gluing step alone moves the latent
