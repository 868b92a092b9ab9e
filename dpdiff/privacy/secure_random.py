"""`--secure_mode`: the Poisson sampling and the Gaussian noise drawn from the operating system's CSPRNG.

Without it, both come from torch's Mersenne Twister seeded with 63 bits of OS entropy: unpredictable to
anyone without the seed, but MT19937's state can be reconstructed from its outputs, so that is not a
cryptographic guarantee. With it, every uniform comes from `os.urandom` (the kernel's ChaCha20 CSPRNG),
53 bits a value; the Gaussian is the Box-Muller transform of two such uniforms in float64, rounded to the
float32 the noise is added in. Sampling in twice the target precision and rounding is the usual
mitigation of the floating-point attacks on Gaussian samplers (Jin et al., S&P 2022); it is not an exact
discrete Gaussian. Drawn on the CPU in bounded chunks and copied to the device: docs/privacy.md gives the
measured cost per million parameters."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

CHUNK = 1 << 22  # values per os.urandom call: bounds the float64 scratch memory (32 MB)


def secure_uniform(count: int) -> torch.Tensor:
    """[count] float64 uniforms in (0, 1] from the OS CSPRNG (53 random bits each)."""
    bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy((bits.astype(np.float64) + 1.0) * 2.0**-53)


def secure_normal_(out: torch.Tensor, std: float) -> torch.Tensor:
    """Fill the flat float tensor `out` with i.i.d. N(0, std^2) from the OS CSPRNG, in place."""
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        pairs = (n + 1) // 2
        u = secure_uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        flat[start : start + n].copy_((z * std).to(flat.dtype))
    return out


def secure_poisson_subset(num_samples: int, sample_rate: float) -> list[int]:
    """Indices each kept independently with probability `sample_rate` (Poisson subsampling)."""
    return torch.nonzero(secure_uniform(num_samples) < sample_rate).flatten().tolist()
