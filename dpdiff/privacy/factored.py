"""Per-example gradients of a linear map kept in factored form (book-keeping, Bu et al. 2023).

The weight gradient of one example of a Linear layer (or of a convolution, on its unfolded input) is

    dW_i = G_i^T X_i          G_i: [T, out] output gradients,  X_i: [T, in] inputs of example i's T rows

Materialising all dW_i costs b*T*in*out operations and a [b, out, in] buffer. Kept as (G, X) instead,
clipping needs only
  - the per-example norms, by the ghost-norm identity ||G_i^T X_i||_F^2 = sum((G_i G_i^T) * (X_i X_i^T)),
    b*T^2*(in+out) operations and no per-example weight buffer, and
  - ONE product for the clipped sum, sum_i c_i dW_i = (c * G)^T X over all b*T rows: the cost of the
    weight gradient of plain training.
That wins exactly when T*(in + out) < in*out (short sequences, wide layers: `worth_factoring`); with
long sequences (64x64 latents: T = 4096) the dense per-example gradient is cheaper and is kept.

`FactoredGradSample` is a tensor subclass of shape [b, *param.shape]: every torch operation on it sees
the dense per-example gradients (materialised once, on first use), so any reader of `p.grad_sample`
gets the same numbers as before; the engine and the flat-clipping optimizer use its fast paths
(`sq_norms`, `clipped_sum`, `fold`, ...). In-place operations are refused: they would change only the
dense copy. Both factors are kept in fp32, so norms and clipped sums are formed in fp32 whatever the
forward's precision."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_map


def worth_factoring(tokens: int, fan_in: int, fan_out: int) -> bool:
    """True where the ghost norm + one clipped-sum product beat materialising b x out x in gradients."""
    return tokens * (fan_in + fan_out) < fan_in * fan_out


@contextlib.contextmanager
def _full_fp32_matmuls(device_type: str):
    """fp32 products with fp32 rounding (u = 2^-24) whatever autocast or TF32 settings the caller runs under."""
    precision = torch.get_float32_matmul_precision()
    if precision == "highest" and not torch.is_autocast_enabled(device_type):
        yield  # already so (the common case, once per layer and step): no context switches
        return
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


class FactoredGradSample(torch.Tensor):
    """[b, *param_shape] per-example gradients dW_i = scale * g[i]^T x[i] (g: [b, T, out], x: [b, T, in]).

    The scalar `scale` (Opacus' batch-size factor of loss_reduction="mean", 1/K of a fold, a loss scale)
    stays a number until it multiplies the clip factors: no extra pass over G. `kernel_last`: x's columns
    are a conv's patches in (kh, kw, in) order (`patches_token_major`), the weight's are (in, kh, kw)."""

    @staticmethod
    def __new__(cls, g: torch.Tensor, x: torch.Tensor, param_shape, scale: float = 1.0, kernel_last: bool = False):
        return torch.Tensor._make_wrapper_subclass(cls, (g.shape[0], *param_shape), dtype=torch.float32, device=g.device)

    def __init__(self, g: torch.Tensor, x: torch.Tensor, param_shape, scale: float = 1.0, kernel_last: bool = False):
        if g.dim() != 3 or x.dim() != 3 or g.shape[:2] != x.shape[:2]:
            raise ValueError(f"factors must be [b, T, out] and [b, T, in], got {tuple(g.shape)} and {tuple(x.shape)}")
        if kernel_last and len(param_shape) != 4:
            raise ValueError(f"kernel_last factors need a conv weight shape [out, in, kh, kw], got {tuple(param_shape)}")
        self.g, self.x, self.param_shape, self.scale = g.float(), x.float(), tuple(param_shape), float(scale)
        self.kernel_last = kernel_last
        self._dense = None

    def _like(self, g: torch.Tensor, x: torch.Tensor, scale: float) -> "FactoredGradSample":
        return FactoredGradSample(g, x, self.param_shape, scale, self.kernel_last)

    def _in_param_layout(self, t: torch.Tensor) -> torch.Tensor:
        """[*lead, out, columns] -> [*lead, *param_shape] (a kernel_last conv's columns reordered to (in, kh, kw))."""
        if not self.kernel_last:
            return t.reshape(*t.shape[:-2], *self.param_shape)
        out, fan_in, kh, kw = self.param_shape
        return t.reshape(*t.shape[:-2], out, kh, kw, fan_in).movedim(-1, -3).contiguous()

    def __repr__(self, *, tensor_contents=None):
        return f"FactoredGradSample(shape={tuple(self.shape)}, tokens={self.g.shape[1]})"

    # ---- what clipping needs ------------------------------------------------------------------

    def sq_norms(self) -> torch.Tensor:
        """[b] squared Frobenius norms of every dW_i, by the ghost-norm identity (no dW_i formed), rounded UP.

        Where example i's tokens cancel (||dW_i|| far below s_i = sum_t ||g_t|| ||x_t||), the fp32 Grams'
        rounding could under-estimate the norm and so let the clipped gradient exceed C. Every Gram entry
        errs by at most (d u) ||g_t|| ||g_s|| (resp. x), the Hadamard sum by (T^2 u) of its terms, so the
        whole error is below gamma * s_i^2 with gamma = (in + out + T^2 + 4) u; twice that is added: an
        upper bound (privacy-safe), ~1e-4 relative on ordinary examples, fp32 speed (fp64 Grams: 1.6x
        the DP step instead of 1.2x on the wide UNet). s_i comes from the Grams' diagonals (no extra pass
        over the factors), themselves rounded up by their own error bound (1 + d u) before the root."""
        b, t, fan_out = self.g.shape
        fan_in = self.x.shape[2]
        with _full_fp32_matmuls(self.g.device.type):  # the bound assumes fp32 rounding: no autocast, no TF32
            gram_g, gram_x = torch.bmm(self.g, self.g.transpose(1, 2)), torch.bmm(self.x, self.x.transpose(1, 2))
        estimate = (gram_g * gram_x).sum(dim=(1, 2))
        u = 2.0**-24
        sq_g, sq_x = gram_g.diagonal(dim1=1, dim2=2), gram_x.diagonal(dim1=1, dim2=2)  # ||g_t||^2, ||x_t||^2
        s = (sq_g * sq_x).sqrt().sum(dim=1) * ((1 + (fan_out + 2) * u) * (1 + (fan_in + 2) * u) * (1 + (t + 2) * u))
        gamma = 2.0 * (fan_in + fan_out + t * t + 4) * u
        return (estimate.clamp(min=0.0) + gamma * s * s) * self.scale**2

    def clipped_sum(self, factor: torch.Tensor) -> torch.Tensor:
        """sum_i factor[i] * dW_i, in one [out, b*T] x [b*T, in] product; the factor scales the narrower of G, X.
        In full fp32 like the norms: a TF32 / bf16 product would round the factors to a 10 / 7-bit mantissa
        first, so each example's share of the sum could exceed the C its exact norm was clipped to."""
        b, t, out = self.g.shape
        c = (factor.to(self.g) * self.scale).view(b, 1, 1)
        g, x = (self.g, self.x * c) if self.x.shape[2] < out else (self.g * c, self.x)
        with _full_fp32_matmuls(self.g.device.type):
            total = g.reshape(b * t, out).t() @ x.reshape(b * t, -1)
        return self._in_param_layout(total)

    def materialize(self) -> torch.Tensor:
        if self._dense is None:
            dense = self._in_param_layout(torch.bmm(self.g.transpose(1, 2), self.x))
            self._dense = dense.mul_(self.scale) if self.scale != 1.0 else dense
        return self._dense

    # ---- what the engine does to per-example gradients, without materialising them ------------

    def fold(self, num_examples: int, multiplicity: int) -> "FactoredGradSample":
        """The mean of each example's K consecutive rows: their tokens side by side, G scaled by 1/K."""
        t = self.g.shape[1]
        return self._like(self.g.reshape(num_examples, multiplicity * t, -1), self.x.reshape(num_examples, multiplicity * t, -1),
                          self.scale / multiplicity)

    def plus(self, other: "FactoredGradSample") -> "FactoredGradSample":
        """dW_i + dW'_i for the same examples (a layer called twice in one forward): tokens concatenated."""
        if other.kernel_last != self.kernel_last:
            raise ValueError("cannot add factored gradients whose columns are in different orders")
        if other.scale == self.scale:
            return self._like(torch.cat([self.g, other.g], dim=1), torch.cat([self.x, other.x], dim=1), self.scale)
        g = torch.cat([self.g * self.scale, other.g * other.scale], dim=1)
        return self._like(g, torch.cat([self.x, other.x], dim=1), 1.0)

    def scaled(self, scale: float) -> "FactoredGradSample":
        return self._like(self.g, self.x, self.scale / scale)

    def nonfinite_rows(self) -> torch.Tensor:
        """[b] True where example i's factors hold a NaN/inf (then so may its gradient)."""
        b = self.g.shape[0]
        return ~(torch.isfinite(self.g.reshape(b, -1)).all(dim=1) & torch.isfinite(self.x.reshape(b, -1)).all(dim=1))

    def zero_rows(self, rows: torch.Tensor) -> "FactoredGradSample":
        """The same with example rows' gradients exactly zero (out of place: X may be shared by layers)."""
        keep = (~rows).view(-1, 1, 1)
        return self._like(torch.where(keep, self.g, 0.0), torch.where(keep, self.x, 0.0), self.scale)

    # ---- every other use sees the dense tensor --------------------------------------------------

    def numpy(self, *args, **kwargs):  # not torch ops: a wrapper subclass has no storage of its own
        return self.materialize().numpy(*args, **kwargs)

    def tolist(self):
        return self.materialize().tolist()

    def __deepcopy__(self, memo):
        return self.materialize().clone()

    def __reduce_ex__(self, protocol):  # pickles / torch.save as the dense tensor
        return self.materialize().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            raise RuntimeError(f"{func} would modify only a dense copy of a factored per-example gradient; "
                               "assign a new tensor to p.grad_sample instead")
        dense = lambda t: t.materialize() if isinstance(t, FactoredGradSample) else t  # noqa: E731
        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))


def sq_norms(grad_sample: torch.Tensor) -> torch.Tensor:
    """[b] squared norms of per-example gradients, factored or dense."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.sq_norms()
    return grad_sample.reshape(len(grad_sample), -1).float().norm(dim=1).square()  # a fused reduction, no b x P temporary


def clipped_sum(grad_sample: torch.Tensor, factor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """sum_i factor[i] * grad_sample[i] in the parameter's dtype and shape."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.clipped_sum(factor).to(param.dtype).view_as(param)
    grad_sample = grad_sample.to(param.dtype)
    with _full_fp32_matmuls(grad_sample.device.type):  # the norms were taken of these very rows: no rounding between
        total = factor.to(grad_sample) @ grad_sample.reshape(len(grad_sample), param.numel())
    return total.view_as(param)


def unscaled(grad_sample: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 per-example gradients divided by a loss scale, factored or dense."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.scaled(scale)  # its factors are fp32 already
    return grad_sample.float() / scale


def folded(grad_sample: torch.Tensor, num_examples: int, multiplicity: int) -> torch.Tensor:
    """[num_examples, ...]: the mean of each example's `multiplicity` consecutive rows, factored or dense."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.fold(num_examples, multiplicity)
    return grad_sample.reshape(num_examples, multiplicity, *grad_sample.shape[1:]).mean(dim=1)


def nonfinite_rows(grad_sample: torch.Tensor) -> torch.Tensor:
    """[b] True where an example's per-example gradient (or its factors) holds a NaN/inf."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.nonfinite_rows()
    return ~torch.isfinite(grad_sample.reshape(len(grad_sample), -1)).all(dim=1)


def zero_rows(grad_sample: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The same per-example gradients with `rows` exactly zero (out of place)."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.zero_rows(rows)
    return torch.where(rows.view(-1, *[1] * (grad_sample.dim() - 1)), 0.0, grad_sample)
