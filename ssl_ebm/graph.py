"""Graph smoothing of the prior's classifier over the latent space (not the paper; model.graph_smoothing).

Why: the encoder places the unlabelled pool so that classes cluster in mu-space more clearly than the
prior's head f(mu) separates them (launch/diagnose.py: a 1-nearest-neighbour vote on mu scores 97.5% on
pendigits' validation rows where f(mu) scores 87.9%). Label spreading (Zhou et al. 2004) over a
k-nearest-neighbour graph of the pool's mu, started from softmax f(mu) rather than from nothing and with the
labelled rows held at their labels, carries that structure into the prediction; class-mass normalisation then
restores f's class shares on the pool, so that spreading does not tilt the class prior (what cost the
20-label binary tables when labels alone were spread).

A new row x is classified inductively (it never changes the graph): the smoothed labels Y of its k nearest
graph rows in mu-space, averaged, mixed with its own softmax f(mu(x)), reweighted by the class-mass weights w:
    q(y|x) ∝ w_y [alpha mean_{n in kNN(mu(x))} Y_n,y + (1 - alpha) softmax f(mu(x))_y].

Legend: N graph rows (the labelled rows first, then the pool), L labelled rows, B a batch, Z latent size,
K classes, k neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def encode(net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu(x), softmax f(mu(x))) of a LatentEBM, in float32: what the graph is built from and read with."""
    mu_BZ = net.encoder(x)[0]
    return mu_BZ.float(), torch.softmax(net.prior(mu_BZ).float(), dim=-1)


def knn(query_BZ: torch.Tensor, keys_NZ: torch.Tensor, k: int, exclude_self: bool = False,
        chunk: int = 4096) -> torch.Tensor:
    """Indices (B, k) of each query's k nearest keys (Euclidean); exclude_self drops the nearest one
    (queries that are the keys themselves)."""
    extra = int(exclude_self)
    out = []
    for q in query_BZ.split(chunk):
        d = torch.cdist(q.float(), keys_NZ.float())
        out.append(d.topk(k + extra, dim=1, largest=False).indices[:, extra:])
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def spread(neighbours_Nk: torch.Tensor, start_NK: torch.Tensor, num_labelled: int, alpha: float,
           iterations: int = 30) -> torch.Tensor:
    """Label spreading: Y <- alpha * mean of the neighbours' Y + (1 - alpha) * start, with the first
    `num_labelled` rows held at their start (their one-hot labels)."""
    y_NK = start_NK.clone()
    for _ in range(iterations):
        y_NK = alpha * y_NK[neighbours_Nk].mean(1) + (1 - alpha) * start_NK
        y_NK[:num_labelled] = start_NK[:num_labelled]
    return y_NK


@dataclass
class GraphMemory:
    """The smoothed class probabilities of the graph's rows, and what classifies a new row with them."""

    mu_NZ: torch.Tensor
    y_NK: torch.Tensor
    weight_K: torch.Tensor  # class-mass normalisation
    neighbours: int
    alpha: float

    @classmethod
    def build(cls, mu_LZ: torch.Tensor, y_L: torch.Tensor, mu_UZ: torch.Tensor, p_UK: torch.Tensor,
              neighbours: int = 10, alpha: float = 0.9, iterations: int = 30) -> "GraphMemory":
        """From the labelled rows (mu, labels) and the pool (mu, softmax f(mu)). With fewer rows than
        `neighbours` + 1 (a small fit whose every row is labelled: no pool), each row reads all the others."""
        N, K = len(mu_LZ) + len(mu_UZ), p_UK.shape[1]
        if N < 2:
            raise ValueError(f"graph smoothing needs at least 2 rows; got {len(mu_LZ)} labelled and "
                             f"{len(mu_UZ)} unlabelled")
        neighbours = min(neighbours, N - 1)
        mu_NZ = torch.cat([mu_LZ, mu_UZ]).float()
        start_NK = torch.cat([torch.nn.functional.one_hot(y_L.long(), K).to(p_UK.dtype), p_UK]).double()
        y_NK = spread(knn(mu_NZ, mu_NZ, neighbours, exclude_self=True), start_NK, len(mu_LZ), alpha, iterations)
        pool_NK = y_NK[len(mu_LZ):]
        weight_K = p_UK.double().mean(0) / pool_NK.mean(0).clamp_min(1e-12) if len(pool_NK) else torch.ones(K)
        return cls(mu_NZ, y_NK, weight_K.double(), neighbours, alpha)

    @classmethod
    def from_batches(cls, encode_fn: Callable, labelled: Iterable[dict], unlabelled: Iterable[dict], pool_rows: int,
                     pool_size: int, seed: int, neighbours: int, alpha: float, device=None) -> "GraphMemory":
        """From one pass over the labelled split and one over the unlabelled split ({"x", "y", "idx"} batches, as
        data.eval_batches gives): every labelled row and pool_size of the pool_rows unlabelled ones (a random
        choice fixed by `seed`, so that whoever builds it from the same shards and weights builds the same graph).
        encode_fn(x) -> (mu_BZ, softmax f(mu) p_BK)."""
        keep = torch.zeros(pool_rows, dtype=torch.bool)
        keep[torch.randperm(pool_rows, generator=torch.Generator().manual_seed(seed))[:pool_size]] = True
        parts = []
        for batches, choose in ((labelled, False), (unlabelled, True)):
            mus, probs, ys = [], [], []
            for batch in batches:
                rows = keep[batch["idx"]] if choose else torch.ones(len(batch["y"]), dtype=torch.bool)
                if rows.any():
                    mu, p = encode_fn(batch["x"][rows].to(device))
                    mus.append(mu.float()), probs.append(p.float()), ys.append(batch["y"][rows].to(mu.device))
            parts.append((mus, probs, ys))
        if not parts[0][0] and not parts[1][0]:
            raise ValueError("graph smoothing found neither labelled nor unlabelled rows")
        like = next(p for p in parts if p[0])  # an empty split (no pool: a fit whose every row is labelled; or no
        (mu_l, _, y_l), (mu_u, p_u, _) = (  # labels) takes the other's widths
            [torch.cat(t) for t in part] if part[0] else [t[0][:0] for t in like] for part in parts)
        return cls.build(mu_l, y_l, mu_u, p_u, neighbours, alpha)

    @classmethod
    def from_shards(cls, net, url: str, cfg, device=None, alpha: float | None = None,
                    num_workers: int = 0) -> "GraphMemory":
        """model.graph_smoothing's graph for `net` from the shards at `url` (cfg: the run's Config): its labelled
        split and cfg.model.graph_pool rows of its unlabelled split, chosen by cfg.train.seed; `alpha` overrides
        cfg.model.graph_smoothing. Whoever calls it with the same shards and weights (training's evaluation on
        every rank, ssl_ebm.load, launch/diagnose.py) builds the same graph."""
        from ssl_ebm import data  # the shard reader; the rest of this module is torch alone

        mc = cfg.model
        read = lambda split: data.eval_batches(url, split, batch_size=cfg.data.eval_batch,  # noqa: E731
                                               num_workers=num_workers)
        return cls.from_batches(lambda x: encode(net, x), read("labelled"), read("unlabelled"),
                                data.read_manifest(url)["splits"]["unlabelled"]["count"], mc.graph_pool,
                                cfg.train.seed, mc.graph_neighbours, mc.graph_smoothing if alpha is None else alpha,
                                device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mu_NZ": self.mu_NZ.cpu().contiguous(), "y_NK": self.y_NK.cpu().contiguous(),
                "weight_K": self.weight_K.cpu().contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], neighbours: int, alpha: float) -> "GraphMemory":
        return cls(state["mu_NZ"], state["y_NK"], state["weight_K"], neighbours, alpha)

    def proba(self, mu_BZ: torch.Tensor, p_BK: torch.Tensor) -> torch.Tensor:
        """q(y|x) (B, K) for rows with latent mu_BZ and softmax f(mu) p_BK."""
        dev = mu_BZ.device
        idx_Bk = knn(mu_BZ, self.mu_NZ.to(dev), self.neighbours)
        q_BK = self.alpha * self.y_NK.to(dev)[idx_Bk].mean(1) + (1 - self.alpha) * p_BK.double()
        q_BK = q_BK * self.weight_K.to(dev)
        return q_BK / q_BK.sum(1, keepdim=True)
