"""The shared feature extractor: real pretrained EfficientNet-Lite0 weights on real Fashion-MNIST."""

import pytest
import torch

from dpdiff.data import load_source
from dpdiff.data.transforms import images_to_tensor
from dpdiff.errors import ConfigError, DataError
from dpdiff.features import EFFICIENTNET_LITE0_DEFAULT_LAYERS, load_feature_extractor

INPUT_SIZE = 64  # small input keeps the test fast on a CPU; the weights are the ImageNet ones


@pytest.fixture(scope="module")
def extractor():
    return load_feature_extractor("efficientnet_lite0", input_size=INPUT_SIZE, batch_size=32)


@pytest.fixture(scope="module")
def fashion():
    src = load_source("fashion_mnist", split="test", limit=300, seed=0)
    images = images_to_tensor(src.dataset["image"], resolution=28, channels=1)
    labels = torch.tensor(src.dataset["label"])
    return images, labels


def test_shapes_and_determinism(extractor, fashion):
    images, _ = fashion
    x = images[:10]
    a = extractor.pooled(x)
    b = extractor.pooled(x)
    assert a.shape == (10, 1280)
    assert torch.equal(a, b)
    acts = extractor.layer_features(x)
    assert len(acts) == len(EFFICIENTNET_LITE0_DEFAULT_LAYERS)
    assert [t.shape[1] for t in acts] == [16, 24, 40, 80, 112, 192, 320]  # stage1 ... stage7
    assert all(t.shape[0] == 10 for t in acts)
    # batching does not change the result
    c = extractor.pooled(x, batch_size=3)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_grey_equals_rgb_repeat_and_rgb_works(extractor, fashion):
    images, _ = fashion
    grey = images[:4]
    rgb = grey.repeat(1, 3, 1, 1)
    torch.testing.assert_close(extractor.pooled(grey), extractor.pooled(rgb))
    coloured = rgb.clone()
    coloured[:, 0] = -coloured[:, 0]
    assert not torch.allclose(extractor.pooled(coloured), extractor.pooled(rgb))
    # any input size is resized to the extractor's own
    big = torch.nn.functional.interpolate(rgb, size=(96, 96), mode="bilinear")
    assert extractor.pooled(big).shape == (4, 1280)


def test_pretrained_features_separate_real_classes(extractor, fashion):
    images, labels = fashion
    feats = extractor.pooled(images)
    ft, fb = feats[labels == 1][:20], feats[labels == 8][:20]  # trousers, bags
    assert len(ft) >= 10 and len(fb) >= 10
    within = (torch.cdist(ft, ft).sum() / (len(ft) * (len(ft) - 1)) + torch.cdist(fb, fb).sum() / (len(fb) * (len(fb) - 1))) / 2
    between = torch.cdist(ft, fb).mean()
    assert between > 1.1 * within, (between.item(), within.item())
    # nearest class centroid on held-out images: ImageNet weights give ~0.67 here, random init ~0.46, chance 0.1
    train, test = slice(0, 150), slice(150, None)
    centroids = torch.stack([feats[train][labels[train] == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(feats[test], centroids).argmin(1) == labels[test]).float().mean().item()
    assert accuracy > 0.55, accuracy


def test_frozen_but_differentiable_in_the_input(extractor, fashion):
    images, _ = fashion
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    x = images[:2].clone().requires_grad_(True)
    out = extractor.extract(x)
    (out.pooled.sum() + sum(a.mean() for a in out.layers)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())
    assert extractor.pooled(images[:2]).requires_grad is False


def test_bad_input_is_refused(extractor):
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        load_feature_extractor("inception")
    with pytest.raises(ConfigError, match="layers"):
        load_feature_extractor("efficientnet_lite0", layers=["stage9"])
    with pytest.raises(DataError, match="C = 1"):
        extractor.pooled(torch.zeros(2, 2, 28, 28))


def test_vgg19_without_torchvision_says_how_to_fix():
    try:
        import torchvision.models  # noqa: F401
    except Exception:
        with pytest.raises(ConfigError, match="torchvision"):
            load_feature_extractor("vgg19")
    else:
        pytest.skip("torchvision works here; vgg19 would download weights")
