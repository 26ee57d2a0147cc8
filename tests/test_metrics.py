"""Metrics against independent references: scipy Fréchet distance, closed-form MMD, PSNR and SSIM formulas."""

import json
import urllib.error

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from torch import nn
from torchvision.transforms.functional import to_pil_image

from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.digits import load_digits_tensors, to_unit
from diffguide.tasks.metrics import (
    FID, KID, LPIPS, PSNR, SSIM, CLIPScore, ClassifierAccuracy, DigitFeatures, ImageMetrics, InceptionFeatures,
    MissingWeightsError,
    extractor_id, load_open_clip, load_real_stats, real_stats_file,
)


class LinearFeatures(nn.Module):
    """A fixed random projection of the pixels: full-rank features, so scipy's sqrtm is well conditioned."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, self.num_features)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(1))

    def forward(self, images):
        return self.proj(images.to(self.proj.weight.dtype).flatten(1))


def scipy_fid(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)


def poly_mmd2_unbiased(x, y):
    """Unbiased MMD^2 with the KID kernel k(a, b) = (a.b / d + 1)^3, written out."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


@pytest.fixture(scope="module")
def digits():
    train = to_unit(load_digits_tensors("train")[0][:200])
    test = to_unit(load_digits_tensors("test")[0][:150])
    return train, test


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 4},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("clip") / "test-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return load_open_clip("test-tiny-clip")


def test_fid_matches_scipy_frechet_distance(digits):
    real, fake = digits
    fake = (fake + 0.2 * torch.rand(fake.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    feature = LinearFeatures()
    fid = FID(feature)
    fid.update(real, real=True)
    for chunk in fake.split(64):
        fid.update(chunk, real=False)
    with torch.no_grad():
        expected = scipy_fid(feature(real).double().numpy(), feature(fake).double().numpy())
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3


def test_digit_features_feed_the_classifier_in_its_own_range(digits):
    real, _ = digits
    classifier = DigitClassifier().eval()
    feature = DigitFeatures(classifier)
    assert feature.num_features == classifier.feature_dim
    torch.testing.assert_close(feature(real), classifier.features(real * 2 - 1))
    assert extractor_id(feature) != extractor_id(DigitFeatures(DigitClassifier()))
    fid = FID(feature)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-4                              # same set -> zero distance


def test_kid_equals_unbiased_mmd_and_is_reproducible(digits):
    real, fake = digits
    feature = LinearFeatures()
    real = real[: len(fake)]                                                 # equal sizes: one subset = all rows
    kid = KID(feature, subsets=1, subset_size=10_000)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    mean, std = kid.compute()
    with torch.no_grad():
        expected = poly_mmd2_unbiased(feature(real).double(), feature(fake).double())
    assert float(mean) == pytest.approx(float(expected), rel=1e-4)
    noisy = KID(feature, subsets=20, subset_size=50)
    noisy.update(real, real=True)
    noisy.update(torch.rand_like(fake), real=False)
    first, second = noisy.compute(), noisy.compute()
    assert float(first[0]) == float(second[0])                              # fixed subset seed
    assert float(first[0]) > 10 * abs(float(mean))                           # noise is far from digits


def test_real_statistics_round_trip(tmp_path, digits):
    real, fake = digits
    feature = LinearFeatures()
    direct = ImageMetrics(["fid", "kid"], feature=feature, kid_subset_size=50)
    direct.update_real(real)
    path = real_stats_file("digits-test", extractor_id(feature), tmp_path)
    direct.save_real(path, metadata={"num_images": len(real)})
    direct.update(fake)
    cached = ImageMetrics(["fid", "kid"], feature=feature, kid_subset_size=50)
    assert cached.load_real(path) == {"num_images": len(real)}
    cached.update(fake)
    assert cached.compute() == direct.compute()
    cached.reset()                                                            # real side survives reset
    cached.update(fake[:20])
    assert set(cached.compute()) == {"fid", "kid", "kid_std"}
    for name in ("fid", "kid"):                              # the real image size is restored with the statistics
        with pytest.raises(ValueError, match="generated images are 8x8, the real images were 16x16"):
            cached.metrics[name].update(fake[:4, :, :8, :8], real=False)


def test_psnr_and_ssim_against_formulas():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 16, 16, generator=gen)
    images = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(0, 1)
    psnr = PSNR()
    psnr.update(images, target)
    mse = ((images - target) ** 2).flatten(1).mean(1)
    assert float(psnr.compute()) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)

    a = torch.full((2, 1, 16, 16), 0.3, dtype=torch.float64)     # float64: the variance terms vanish exactly
    b = torch.full((2, 1, 16, 16), 0.7, dtype=torch.float64)
    ssim = SSIM()
    ssim.update(a, b)
    c1 = 0.01**2                                 # constant images: luminance term only
    assert float(ssim.compute()) == pytest.approx((2 * 0.3 * 0.7 + c1) / (0.3**2 + 0.7**2 + c1), rel=1e-4)
    ssim.reset()
    ssim.update(target, target)
    assert float(ssim.compute()) == pytest.approx(1.0, abs=1e-6)


def test_clip_score_equals_open_clip_cosine(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten digit one", "the number 2", "a drawing of the digit three", "four", "5"]
    score = CLIPScore(model, preprocess, tokenizer)
    score.update(images[:3], prompts[:3])
    score.update(images[3:], prompts[3:])
    with torch.no_grad():
        pixels = torch.stack([preprocess(to_pil_image((img * 255).round().byte()).convert("RGB")) for img in images])
        cos = (model.encode_image(pixels, normalize=True) * model.encode_text(tokenizer(prompts), normalize=True)).sum(-1)
    assert float(score.compute()) == pytest.approx(float((100 * cos).mean().clamp(min=0)), rel=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        score.update(images, prompts[:2])


def test_classifier_accuracy_counts_matches():
    class Brightness(nn.Module):                  # predicts class 1 for bright images, else 0
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0).float()
            return torch.stack([1 - bright, bright] + [torch.zeros_like(bright)] * 8, dim=1)

    images = torch.cat([torch.zeros(3, 1, 16, 16), torch.ones(5, 1, 16, 16)])
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])               # 2 + 3 right
    acc = ClassifierAccuracy(Brightness())
    acc.update(images, labels)
    assert float(acc.compute()) == pytest.approx(5 / 8)


def test_bad_inputs_raise_clear_errors(tmp_path, digits):
    real, _ = digits
    feature = LinearFeatures()
    with pytest.raises(ValueError, match="unknown metric"):
        ImageMetrics(["fid", "inception_score"], feature=feature)
    with pytest.raises(ValueError, match="needs classifier"):
        ImageMetrics(["accuracy"])
    metrics = ImageMetrics(["fid", "psnr"], feature=feature)
    with pytest.raises(ValueError, match=r"\[0, 1\].*to_unit"):
        metrics.update(real * 2 - 1, target=real)
    with pytest.raises(TypeError, match="float"):
        metrics.update((real * 255).byte(), target=real)
    diverged = real[:6].clone()
    diverged[2, 0, 3, 3], diverged[4, 0, 0, 0] = float("nan"), float("inf")
    for update in (lambda: metrics.update(diverged, target=real[:6]), lambda: FID(feature).update(diverged, real=True)):
        with pytest.raises(ValueError, match=r"finite .* NaN or inf in 2 of 6 images \(indices 2, 4\)"):
            update()
    with pytest.raises(ValueError, match="finite"):
        ClassifierAccuracy(DigitClassifier()).update(torch.full_like(real[:2], float("nan")), [0, 1])
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(real[:4], target=real[:5])
    with pytest.raises(ValueError, match="needs target"):
        metrics.update(real[:4])
    metrics.update(real[:8], target=real[:8])
    with pytest.raises(ValueError, match="no real statistics"):
        metrics.compute()
    metrics.update_real(real)
    with pytest.raises(ValueError, match="real images were 16x16"):
        metrics.update(real[:4, :, :8, :8], target=real[:4, :, :8, :8])
    one = FID(feature)
    one.update(real, real=True)
    one.update(real[:1], real=False)
    with pytest.raises(ValueError, match="at least 2 generated"):
        one.compute()
    with pytest.raises(FileNotFoundError, match="no real statistics"):
        load_real_stats(tmp_path / "missing.safetensors", fid=FID(feature))
    with pytest.raises(TypeError, match="num_features"):
        FID(nn.Identity())


def test_offline_weights_give_clear_errors(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPS("alex")
    with pytest.raises((ImportError, RuntimeError), match="fid|weights"):
        InceptionFeatures()
    with pytest.raises((ImportError, RuntimeError), match="fid|weights"):
        ImageMetrics(["fid"])                                          # Inception is the default extractor


def test_lpips_with_cached_backbone(monkeypatch, tmp_path):
    import torchvision

    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), checkpoints / "squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    lpips = LPIPS("squeeze")
    lpips.update(images, images)
    assert float(lpips.compute()) == pytest.approx(0.0, abs=1e-6)
    lpips.update(images, images.flip(-1))
    assert float(lpips.compute()) > 0
