"""Factored (book-keeping) convolution gradients: the token-major patches they read, and their per-example
gradients, clipped sums and norms against the one-example loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpdiff.privacy.factored import FactoredGradSample
from dpdiff.privacy.fused_layers import patches_token_major
from dpdiff.privacy.grad_samplers import FUSED_MODE, wrap_for_per_sample_grads
from test_grad_samplers import _backward, _close, _loop_grads, _mse_losses


@pytest.mark.parametrize("kernel, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 1, 1), ((3, 1), 1, (2, 0), (2, 1)),
                                                              (1, 1, 0, 1), (2, 2, 0, 1)])
def test_token_major_patches_are_unfold_in_kernel_last_order(kernel, stride, padding, dilation):
    """`patches_token_major` (the conv per-example gradients' input) holds F.unfold's patches, columns
    reordered (in, kh, kw) -> (kh, kw, in), also for an input that is not contiguous."""
    conv = nn.Conv2d(5, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 9, 7, 5).permute(0, 3, 1, 2)  # [3, 5, 9, 7], channels-last in memory
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [n, in*kh*kw, L]
    kh, kw = conv.kernel_size
    expected = cols.view(3, 5, kh, kw, -1).permute(0, 4, 2, 3, 1).reshape(3, cols.shape[2], kh * kw * 5)
    patches = patches_token_major(x, conv)
    assert patches.is_contiguous() and patches.shape == expected.shape == (3, conv(x).shape[2] * conv(x).shape[3], kh * kw * 5)
    torch.testing.assert_close(patches, expected, rtol=0, atol=0)


class _WideConvs(nn.Module):
    """Convolutions wide enough, on inputs small enough, that book-keeping keeps their gradients factored."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_factored_conv_gradients_match_the_loop_and_clip_like_dense():
    torch.manual_seed(0)
    model = _WideConvs()
    g = torch.Generator().manual_seed(5)
    x, target = torch.randn(3, 16, 3, 4, generator=g), torch.randn(3, 16, 2, 1, generator=g)
    expected = _loop_grads(model, _mse_losses, [(x[i:i + 1], target[i:i + 1]) for i in range(3)])
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    wrapped.book_keeping = True
    _backward(wrapped, _mse_losses, (x.clone().requires_grad_(), target))
    for name in ("a.weight", "b.weight"):
        p = dict(model.named_parameters())[name]
        assert isinstance(p.grad_sample, FactoredGradSample) and p.grad_sample.kernel_last, name
        dense = p.grad_sample.materialize().clone()
        _close(dense, expected[name])
        factor = torch.tensor([0.5, 1.0, 0.25])
        torch.testing.assert_close(p.grad_sample.clipped_sum(factor), torch.einsum("b,b...->...", factor, dense), rtol=1e-5, atol=1e-6)
        assert (p.grad_sample.sq_norms().double() >= dense.double().flatten(1).pow(2).sum(1) * (1 - 1e-6)).all()
    wrapped._close()
