"""One Algorithm-1 gradient on a fixed global batch, split over however many processes run this.

Each process takes its slice of the unlabelled, labelled and negative samples (identical noise), the
negatives are all-gathered as in training, DDP averages the gradients; the main process saves them.
Run with plain python for 1 process or `accelerate launch` for several.
"""

import sys

import torch

from ssl_ebm import runtime
from ssl_ebm.config import load_config
from ssl_ebm.model import LatentEBM

out = sys.argv[1]
cfg = load_config(None, ["model.x_shape=[12]", "model.num_classes=3", "model.z_dim=4", "model.hidden=16",
                         "model.prior_hidden=16", "model.energy_penalty=0.1"])
acc = runtime.make_accelerator(cfg)
runtime.seed_everything(0)
model = acc.prepare(LatentEBM(cfg.model))

n_u, n_l, n_neg = 8, 4, 8
g = torch.Generator().manual_seed(123)
x_u, x_l = torch.randn(n_u, 12, generator=g), torch.randn(n_l, 12, generator=g)
y_l = torch.randint(0, 3, (n_l,), generator=g)
eps_u, eps_l = torch.randn(n_u, 4, generator=g), torch.randn(n_l, 4, generator=g)
z_neg = 1.5 * torch.randn(n_neg, 4, generator=g)

r, w = acc.process_index, acc.num_processes
mine = lambda t: t.chunk(w)[r]  # noqa: E731 - this rank's slice
z_neg_all = runtime.gather(acc, mine(z_neg))  # as in training: every rank uses the global negatives
assert torch.equal(z_neg_all, z_neg)
terms = model(mine(x_u), mine(x_l), mine(y_l), z_neg_all, eps=torch.cat([mine(eps_u), mine(eps_l)]))
acc.backward(terms["loss"])
if acc.is_main_process:
    net = acc.unwrap_model(model)
    torch.save({"num_processes": w, "grads": {n: p.grad.clone() for n, p in net.named_parameters()}}, out)
acc.wait_for_everyone()
runtime.exit_process(0)  # tear gloo down and leave, as launch/train.py does
