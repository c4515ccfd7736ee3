"""log p(x|z) for the generator's output, and the KL of q(z|x) to the base measure p0.

Everything is computed in fp32 (inputs are cast), so a bf16 autocast region is safe.
Shapes: B batch, Z latent dim; x and out are (B, *x_shape).
"""

import math

import torch

from ssl_ebm.config import LIKELIHOODS


def log_likelihood(kind: str, x: torch.Tensor, out: torch.Tensor, obs_sigma: float) -> torch.Tensor:
    """Per-example log p(x|z), shape (B,), summed over all data dimensions.

    "gaussian": x = g(z) + N(0, obs_sigma^2 I) (sec. 2.1), with the full normalising constant.
    "multinomial": x holds word counts, out the V logits: sum_v x_v log softmax(out)_v. The
    multinomial coefficient log(N! / prod_v x_v!) does not depend on any parameter and is NOT
    included, so this is log p(x|z) up to a per-document constant.
    """
    x, out = x.float(), out.float()
    if kind == "gaussian":
        d = x[0].numel()
        sq_B = (x - out).pow(2).flatten(1).sum(1)
        return -0.5 * sq_B / obs_sigma**2 - d * (math.log(obs_sigma) + 0.5 * math.log(2 * math.pi))
    if kind == "multinomial":
        return (x * torch.log_softmax(out, dim=-1)).sum(-1)
    raise ValueError(f"likelihood {kind!r}: valid choices are {', '.join(LIKELIHOODS)}")


def kl_to_p0(mu_BZ: torch.Tensor, logvar_BZ: torch.Tensor, sigma0: float) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, sigma0^2 I)), analytic, shape (B,) (the KL term of eq. 11)."""
    mu_BZ, logvar_BZ = mu_BZ.float(), logvar_BZ.float()
    s2 = sigma0**2
    return 0.5 * ((logvar_BZ.exp() + mu_BZ.pow(2)) / s2 - 1.0 - logvar_BZ + math.log(s2)).sum(-1)
