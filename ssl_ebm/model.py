"""The one trainable module: encoder q(z|x), generator p(x|z), latent EBM prior f(z), and its loss.

The loss is built so that its gradient IS Algorithm 1, steps 4-6 (as a quantity to minimise):
    unlabelled x:  mean_B[ -log p(x|z+) + KL(q(z|x) || p0) - F(z+) ] + mean_N F(z-)
    labelled (x, y): labelled_weight * cross_entropy(f(z+), y) (label-smoothed by model.label_smoothing)
    optional:        energy_penalty * (mean F(sg(z+))^2 + mean F(z-)^2), sg = stop-gradient
    optional:        -mi_weight * I(y; z+) over the unlabelled batch (the authors' code, not the paper)
    optional:        vat_weight * KL(p(y|x) || p(y|x + r_adv)) with p(y|x) = softmax f(mu(x)), over the
                     unlabelled batch: virtual adversarial training's smoothness term (Miyato et al.) on our
                     classifier, an addition to the paper's method (which its related work cites, as EBM + VAT)
    optional:        consistency_weight * mean (softmax f(mu(x)) - softmax f(mu(x + n)))^2 over the unlabelled
                     batch, n Gaussian input noise: the Pi-model's consistency term (Laine & Aila) on our
                     classifier, also an addition
    optional:        entmin_weight * mean entropy of softmax f(mu(x)) over the unlabelled batch (entropy
                     minimisation, Grandvalet & Bengio), also an addition
    optional:        pseudo_label_weight * mean_B w_b * cross_entropy(f(mu(x_b)), argmax q_b), q the graph's
                     reading of the unlabelled batch (`teacher`, ssl_ebm/graph.py) and w_b = 1 - H(q_b) / log K:
                     label propagation's pseudo-labels (Iscen et al. 2019), also an addition
    optional:        latent_vat_weight * KL(softmax f(mu) || softmax f(mu + s * r_adv)) over the unlabelled batch,
                     s = exp(logvar / 2) the posterior std and |r_adv| = latent_vat_eps: VAT's smoothness term in
                     the latent space, where the perturbation is measured in the posterior's own std (f should
                     not change its mind within the encoder's uncertainty about z), also an addition
with z+ = mu + exp(logvar / 2) * eps from q(z|x) (reparameterised) and z- from the sampler (detached).
The single -F(z+) term is at once the positive phase of the prior's gradient (eq. 10) and the
+F(z+) term of the encoder's ELBO gradient (eq. 11); -F(z-) reaches the prior only; the generator
sees only the reconstruction term. The energy penalty (not in the paper) is a regulariser of the prior
only: it is computed on a detached z+, so its gradient reaches the prior's parameters and never the
encoder (which would otherwise be pushed towards z+ with small |F|). Sign convention of F: see nets/prior.py.

Shapes: B unlabelled batch, M labelled batch, N negative chains, Z latent dim, K classes.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_ebm.baselines import entropy_loss, pi_loss, vat_loss
from ssl_ebm.config import ModelConfig, OptimConfig
from ssl_ebm.likelihood import kl_to_p0, log_likelihood
from ssl_ebm.nets import Prior, build_encoder, build_generator


def batch_mutual_information(logits_BK: torch.Tensor) -> torch.Tensor:
    """In-batch estimate of I(y; z) = H(mean_B p(y|z)) - mean_B H(p(y|z)), p(y|z) = softmax(f(z)).

    Not in the paper: the authors' public code (Pang et al., the text experiments of the latent
    space EBM for semi-supervised learning) adds this term, weighted 100, on the unlabelled batch.
    Maximising it makes each z+ confident about its class (low conditional entropy) while keeping the
    classes used evenly across the batch (high marginal entropy). Selected by model.mi_weight (0 = off).
    """
    log_p_BK = torch.log_softmax(logits_BK.float(), dim=-1)
    p_BK = log_p_BK.exp()
    cond_entropy = -(p_BK * log_p_BK).sum(-1).mean()
    p_K = p_BK.mean(0)
    marg_entropy = -(p_K * torch.log(p_K.clamp_min(1e-12))).sum()
    return marg_entropy - cond_entropy


def pseudo_label_loss(logits_BK: torch.Tensor, mu_BZ: torch.Tensor, teacher) -> torch.Tensor:
    """mean_B w_b * cross_entropy(logits_b, argmax q_b), with q = teacher(mu, softmax logits) read without
    gradient and w_b = 1 - H(q_b) / log K: a confident reading counts fully, a uniform one not at all."""
    with torch.no_grad():
        q_BK = teacher(mu_BZ.detach().float(), torch.softmax(logits_BK.detach().float(), dim=-1)).float()
        entropy_B = -(q_BK * torch.log(q_BK.clamp_min(1e-12))).sum(-1)
        weight_B = (1 - entropy_B / math.log(q_BK.shape[-1])).clamp_min(0)
    ce_B = F.cross_entropy(logits_BK.float(), q_BK.argmax(-1), reduction="none")
    return (weight_B * ce_B).mean()


OBS_SIGMA_MIN = 0.05  # floor of a learned observation std (model.learn_obs_sigma): features are standardised


class LatentEBM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.generator = build_generator(cfg)
        self.prior = Prior(cfg)
        # model.learn_obs_sigma: log std per data dimension, trained with the generator (on the ELBO only)
        self.obs_log_sigma = nn.Parameter(torch.full((math.prod(cfg.x_shape),), math.log(cfg.obs_sigma))) \
            if cfg.learn_obs_sigma else None

    def observation_sigma(self) -> float | torch.Tensor:
        """obs_sigma, or the learned std per data dimension (D,), floored at OBS_SIGMA_MIN."""
        if self.obs_log_sigma is None:
            return self.cfg.obs_sigma
        return self.obs_log_sigma.clamp_min(math.log(OBS_SIGMA_MIN)).exp()

    def log_px(self, x: torch.Tensor, z_BZ: torch.Tensor) -> torch.Tensor:
        """log p(x|z), (B,): the generator's output under model.likelihood, with the observation std
        (observation_sigma) and a table's one-hot blocks (model.categorical_blocks)."""
        return log_likelihood(self.cfg.likelihood, x, self.generator(z_BZ).float(), self.observation_sigma(),
                              self.cfg.categorical_blocks)

    def _check_x(self, x: torch.Tensor, name: str) -> None:
        if tuple(x.shape[1:]) != self.cfg.x_shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, self.cfg.x_shape))})"
                             " from model.x_shape")

    def _present_parts(self, x_u, x_l, y_l, z_neg):
        """forward's inputs with empty batches turned into None, after checking that they fit together."""
        if x_l is not None and y_l is not None and x_l.shape[0] == 0 == y_l.shape[0]:
            x_l = y_l = None
        if x_u is not None and x_u.shape[0] == 0:
            x_u = z_neg = None
        if x_u is None and x_l is None:
            raise ValueError("forward needs a non-empty unlabelled x_u (with z_neg), labelled x_l (with y_l), or both")
        if (x_l is None) != (y_l is None):
            raise ValueError("pass labelled x_l and y_l together")
        if x_u is not None and z_neg is None:
            raise ValueError("x_u needs negative samples z_neg (draw them with langevin.sample_negatives)")
        if x_u is not None:
            self._check_x(x_u, "x_u")
        if x_l is not None:
            self._check_x(x_l, "x_l")
        return x_u, x_l, y_l, z_neg

    def forward(self, x_u: torch.Tensor | None = None, x_l: torch.Tensor | None = None,
                y_l: torch.Tensor | None = None, z_neg: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, teacher=None) -> dict[str, torch.Tensor]:
        """Named loss terms; "loss" is the scalar to backpropagate, the rest are detached fp32 scalars.

        Either part may be missing: x_u=None (with z_neg=None) is the supervised-only baseline,
        whose loss involves only encoder and prior; x_l=y_l=None is unlabelled-only. A part with an
        empty batch (data.batch_labelled=0 gives x_l of shape (0, ...)) counts as missing: the mean of
        an empty batch would make the loss NaN. Every key is always present; the terms of a missing
        part are 0 ("recon", "kl", "F_pos", "F_neg", "z_pos_norm", "z_neg_norm", "mi" without x_u, and
        "mi" with model.mi_weight = 0; "ce", "acc_l" without x_l).
        The eps of z+ is drawn once, from the global RNG, for the batch [x_u; x_l], which also
        goes through the encoder as one batch (one set of BatchNorm statistics). Pass `eps`
        ((B + M, Z), for [x_u; x_l]) to supply that noise instead, e.g. to compare two computations.
        `teacher(mu_BZ, p_BK) -> q_BK` (GraphMemory.proba) gives the pseudo-labels of model.pseudo_label_weight;
        None (before the first graph is built) leaves that term out ("pseudo" 0).
        """
        cfg = self.cfg
        x_u, x_l, y_l, z_neg = self._present_parts(x_u, x_l, y_l, z_neg)
        xs = [x for x in (x_u, x_l) if x is not None]
        n_u = 0 if x_u is None else x_u.shape[0]

        # Algorithm 1, step 3: z+ ~ q(z|x) by the reparameterisation trick; losses in fp32.
        mu, logvar = self.encoder(torch.cat(xs) if len(xs) > 1 else xs[0])
        mu, logvar = mu.float(), logvar.float()
        if eps is None:
            eps = torch.randn_like(mu)
        elif eps.shape != mu.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}; expected {tuple(mu.shape)} (one row per x_u, x_l)")
        z_pos = mu + torch.exp(0.5 * logvar) * eps.to(mu)

        zero = mu.new_zeros(())
        loss = zero
        out = dict(recon=zero, kl=zero, F_pos=zero, F_neg=zero, z_pos_norm=zero, z_neg_norm=zero, ce=zero,
                   acc_l=zero, mi=zero, vat=zero, consistency=zero, entropy=zero, pseudo=zero, latent_vat=zero)
        if x_u is not None:
            z_pos_BZ = z_pos[:n_u]
            z_neg_NZ = z_neg.detach().to(device=mu.device, dtype=torch.float32)
            recon_B = self.log_px(x_u, z_pos_BZ)
            kl_B = kl_to_p0(mu[:n_u], logvar[:n_u], cfg.sigma0)
            F_pos_B = self.prior.free_energy(z_pos_BZ)
            F_neg_N = self.prior.free_energy(z_neg_NZ)
            # Steps 4-5: -(ELBO + F(z+)) for encoder/generator, -(F(z+) - F(z-)) for the prior (eqs. 10-11).
            loss = (-recon_B + kl_B - F_pos_B).mean() + F_neg_N.mean()
            if cfg.energy_penalty > 0:
                # The prior's regulariser only: F of a detached z+, so no gradient reaches the encoder.
                F_pos_sg_B = self.prior.free_energy(z_pos_BZ.detach())
                loss = loss + cfg.energy_penalty * (F_pos_sg_B.pow(2).mean() + F_neg_N.pow(2).mean())
            if cfg.mi_weight > 0:
                mi = batch_mutual_information(self.prior(z_pos_BZ))
                loss = loss - cfg.mi_weight * mi
                out.update(mi=mi)
            for key, (weight, term) in self.classifier_terms(x_u, mu[:n_u], teacher, logvar[:n_u]).items():
                loss = loss + weight * term
                out[key] = term
            out.update(recon=recon_B.mean(), kl=kl_B.mean(), F_pos=F_pos_B.mean(), F_neg=F_neg_N.mean(),
                       z_pos_norm=z_pos_BZ.norm(dim=1).mean(), z_neg_norm=z_neg_NZ.norm(dim=1).mean())
        if x_l is not None:
            # Step 6: log softmax(f(z+))_y for the labelled examples, into prior and encoder.
            logits_MK = self.prior(z_pos[n_u:])
            ce = F.cross_entropy(logits_MK, y_l, label_smoothing=cfg.label_smoothing)
            loss = loss + cfg.labelled_weight * ce
            out.update(ce=ce, acc_l=(logits_MK.argmax(-1) == y_l).float().mean())
        out = {k: v.detach() for k, v in out.items()}
        out.update(loss=loss, logvar_min=logvar.min().detach(), logvar_max=logvar.max().detach())
        return out

    def classifier_terms(self, x_u: torch.Tensor, mu_BZ: torch.Tensor, teacher=None,
                         logvar_BZ: torch.Tensor | None = None) -> dict:
        """The optional terms on the classifier f(mu(x)) of the unlabelled batch (none is the paper's), each
        {key: (weight, term)} for those turned on, in a fixed order (VAT and the Pi-model draw noise).
        The latent VAT term needs the posterior's logvar_BZ."""
        cfg, terms = self.cfg, {}
        pseudo_on = cfg.pseudo_label_weight > 0 and teacher is not None
        logits_BK = self.prior(mu_BZ) if cfg.vat_weight + cfg.consistency_weight + cfg.entmin_weight \
            + cfg.latent_vat_weight or pseudo_on else None
        if cfg.vat_weight > 0:
            terms["vat"] = cfg.vat_weight, vat_loss(self.predict_logits, x_u, cfg.vat_xi,
                                                     cfg.vat_eps * math.sqrt(x_u[0].numel()), logits_BK=logits_BK)
        if cfg.consistency_weight > 0:
            noisy_BK = self.predict_logits(x_u + cfg.consistency_noise * torch.randn_like(x_u))
            terms["consistency"] = cfg.consistency_weight, pi_loss(logits_BK, noisy_BK.float())
        if cfg.entmin_weight > 0:
            terms["entropy"] = cfg.entmin_weight, entropy_loss(logits_BK)
        if pseudo_on:
            terms["pseudo"] = cfg.pseudo_label_weight, pseudo_label_loss(logits_BK, mu_BZ, teacher)
        if cfg.latent_vat_weight > 0:
            if logvar_BZ is None:
                raise ValueError("model.latent_vat_weight needs the posterior's logvar_BZ")
            std_BZ = torch.exp(0.5 * logvar_BZ)
            # f as a function of the perturbation u in posterior-std units: z = mu + std * u
            head = lambda u_BZ: self.prior(mu_BZ + std_BZ * u_BZ)  # noqa: E731
            terms["latent_vat"] = cfg.latent_vat_weight, vat_loss(head, torch.zeros_like(mu_BZ), cfg.vat_xi,
                                                                   cfg.latent_vat_eps, logits_BK=logits_BK)
        return terms

    def free_energy(self, z_BZ: torch.Tensor) -> torch.Tensor:
        """F(z) = logsumexp f(z) (eq. 5), shape (B,)."""
        return self.prior.free_energy(z_BZ)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """f(mu(x)), (B, K): eq. 12 with q(z|x) replaced by its mean; argmax gives the class."""
        mu, _ = self.encoder(x)
        return self.prior(mu)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """p(y|x) ~ softmax(f(mu(x))), (B, K)."""
        return torch.softmax(self.predict_logits(x), dim=-1)

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Adam parameter groups with the per-part learning rates of Algorithm 1 (eta_0, eta_1, eta_2)."""
        sigma = [self.obs_log_sigma] if self.obs_log_sigma is not None else []  # the observation model's
        parts = (("encoder", list(self.encoder.parameters()), optim.lr_encoder),
                 ("generator", [*self.generator.parameters(), *sigma], optim.lr_generator),
                 ("prior", list(self.prior.parameters()), optim.lr_prior))
        return [{"name": name, "params": [p for p in params if p.requires_grad], "lr": lr,
                 "weight_decay": optim.weight_decay} for name, params, lr in parts]
