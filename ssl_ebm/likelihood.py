"""log p(x|z) for the generator's output, and the KL of q(z|x) to the base measure p0.

Everything is computed in fp32 (inputs are cast), so a bf16 autocast region is safe.
Shapes: B batch, Z latent dim; x and out are (B, *x_shape).
"""

import math

import torch

from ssl_ebm.config import LIKELIHOODS


def log_likelihood(kind: str, x: torch.Tensor, out: torch.Tensor, obs_sigma: float | torch.Tensor,
                   blocks: tuple[tuple[int, int], ...] = ()) -> torch.Tensor:
    """Per-example log p(x|z), shape (B,), summed over all data dimensions.

    "gaussian": x = g(z) + N(0, obs_sigma^2 I) (sec. 2.1), with the full normalising constant; obs_sigma is
    a number, or one standard deviation per data dimension (a (D,) tensor: model.learn_obs_sigma).
    "multinomial": x holds word counts, out the V logits: sum_v x_v log softmax(out)_v. The
    multinomial coefficient log(N! / prod_v x_v!) does not depend on any parameter and is NOT
    included, so this is log p(x|z) up to a per-document constant.
    "mixed": a table whose `blocks` (start, size) are one-hot codes of categorical columns
    (shards/make.py): each block is one categorical draw, log softmax(out_block) at the code, and the
    other columns (scaled numbers, 0/1 missing indicators) are Gaussian as above. A Gaussian on a one-hot
    block would charge a wrong category by its squared distance and never make the block sum to one.
    With no blocks (a table of numbers only) "mixed" is the Gaussian likelihood, computed by the same code,
    so that one table default serves tables with and without categorical columns.
    """
    x, out = x.float(), out.float()
    if kind == "gaussian":
        return _gaussian(x.flatten(1), out.flatten(1), obs_sigma)
    if kind == "multinomial":
        return (x * torch.log_softmax(out, dim=-1)).sum(-1)
    if kind == "mixed":
        if not blocks:
            return _gaussian(x.flatten(1), out.flatten(1), obs_sigma)
        numeric_D = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        categorical_B = x.new_zeros(len(x))
        for start, size in blocks:
            numeric_D[start:start + size] = False
            code_BK, logits_BK = x[:, start:start + size], out[:, start:start + size]
            categorical_B = categorical_B + (code_BK * torch.log_softmax(logits_BK, dim=-1)).sum(-1)
        sigma = obs_sigma[numeric_D] if torch.is_tensor(obs_sigma) else obs_sigma
        return _gaussian(x[:, numeric_D], out[:, numeric_D], sigma) + categorical_B
    raise ValueError(f"likelihood {kind!r}: valid choices are {', '.join(LIKELIHOODS)}")


def _gaussian(x_BD: torch.Tensor, out_BD: torch.Tensor, obs_sigma: float | torch.Tensor) -> torch.Tensor:
    d = x_BD.shape[1]
    if torch.is_tensor(obs_sigma):  # one sigma per dimension, (D,)
        sigma_D = obs_sigma.float()
        sq_B = ((x_BD - out_BD) / sigma_D).pow(2).sum(1)
        return -0.5 * sq_B - sigma_D.log().sum() - 0.5 * d * math.log(2 * math.pi)
    sq_B = (x_BD - out_BD).pow(2).sum(1)
    return -0.5 * sq_B / obs_sigma**2 - d * (math.log(obs_sigma) + 0.5 * math.log(2 * math.pi))


def categorical_blocks(manifest: dict) -> tuple[tuple[int, int], ...]:
    """The (start, size) of each one-hot block of a table's shards (the manifest's "columns"), for "mixed";
    () for shards without categorical columns."""
    categorical = (manifest.get("columns") or {}).get("categorical") or []
    return tuple((int(b["start"]), int(b["size"])) for b in categorical)


def trained_likelihood(kind: str, manifest: dict) -> str:
    """The likelihood a run of `kind` trains with on these shards: "mixed" on a table without categorical
    columns is the Gaussian one (log_likelihood computes it by the same code)."""
    return "gaussian" if kind == "mixed" and not categorical_blocks(manifest) else kind


def kl_to_p0(mu_BZ: torch.Tensor, logvar_BZ: torch.Tensor, sigma0: float) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, sigma0^2 I)), analytic, shape (B,) (the KL term of eq. 11)."""
    mu_BZ, logvar_BZ = mu_BZ.float(), logvar_BZ.float()
    s2 = sigma0**2
    return 0.5 * ((logvar_BZ.exp() + mu_BZ.pow(2)) / s2 - 1.0 - logvar_BZ + math.log(s2)).sum(-1)
