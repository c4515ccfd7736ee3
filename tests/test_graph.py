"""Graph smoothing of the prediction over the latent space (ssl_ebm/graph.py)."""

from __future__ import annotations

import pytest
import torch

from ssl_ebm.graph import GraphMemory, knn, spread


def test_knn_matches_a_full_sort_and_can_leave_the_row_itself_out():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 5, generator=g)
    query = torch.randn(40, 5, generator=g)
    expect = torch.cdist(query, keys).argsort(1)[:, :7]
    assert torch.equal(knn(query, keys, 7, chunk=16), expect)
    own = knn(keys, keys, 3, exclude_self=True)
    assert not (own == torch.arange(300)[:, None]).any()
    assert torch.equal(own, torch.cdist(keys, keys).argsort(1)[:, 1:4])


def _two_clusters(n: int = 200, seed: int = 0):
    """Two well-separated clusters in z; f is right but weak on cluster 0, right on most of cluster 1 and
    wrong on a tenth of it (the rows nearest cluster 0's side)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.cat([torch.randn(n, 2, generator=g) * 0.3 + torch.tensor([-3.0, 0.0]),
                    torch.randn(n, 2, generator=g) * 0.3 + torch.tensor([3.0, 0.0])])
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    p1 = torch.where(y == 1, torch.full((2 * n,), 0.7), torch.full((2 * n,), 0.4))
    wrong = (y == 1) & (mu[:, 0] < mu[y == 1, 0].quantile(0.1))
    p1[wrong] = 0.45
    return mu, y, torch.stack([1 - p1, p1], 1), wrong


def test_spreading_holds_the_labelled_rows_and_fills_each_cluster_with_its_label():
    mu, y, _, _ = _two_clusters()
    start = torch.full((len(y), 2), 0.5, dtype=torch.double)
    labelled = torch.tensor([0, 250])  # one labelled row per cluster, moved to the front
    order = torch.cat([labelled, torch.tensor([i for i in range(len(y)) if i not in labelled.tolist()])])
    mu, y = mu[order], y[order]
    start[:2] = torch.nn.functional.one_hot(y[:2], 2).double()
    out = spread(knn(mu, mu, 8, exclude_self=True), start, 2, alpha=0.99, iterations=200)
    assert torch.equal(out[:2], start[:2])
    assert torch.equal(out.argmax(1), y)


def test_memory_corrects_f_where_the_cluster_disagrees_and_keeps_f_class_shares():
    mu, y, p, wrong = _two_clusters()
    lab = torch.tensor([0, 1, 2, 200, 201, 202])
    pool = torch.tensor([i for i in range(len(y)) if i not in lab.tolist()])
    mem = GraphMemory.build(mu[lab], y[lab], mu[pool], p[pool], neighbours=10, alpha=0.9)
    # class-mass normalisation: the pool's smoothed shares, reweighted, are f's shares there
    shares = (mem.y_NK[len(lab):] * mem.weight_K).mean(0)
    torch.testing.assert_close(shares, p[pool].double().mean(0))
    mu_new, y_new, p_new, wrong_new = _two_clusters(seed=1)  # new rows from the same clusters
    q = mem.proba(mu_new, p_new)
    torch.testing.assert_close(q.sum(1), torch.ones(len(q), dtype=q.dtype))
    assert (p_new.argmax(1)[wrong_new] != y_new[wrong_new]).all(), "f is wrong there"
    assert torch.equal(q.argmax(1), y_new), "the graph puts those rows with their cluster"


def test_memory_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        GraphMemory.build(torch.zeros(1, 2), torch.zeros(1), torch.zeros(0, 2), torch.full((0, 2), 0.5))


def test_a_fit_without_a_pool_or_with_few_rows_reads_the_rows_it_has():
    """Every row labelled (no pool): the graph is the labelled rows, each new row reads them all when there are
    fewer than the neighbours asked for."""
    mu = torch.tensor([[-2.0, 0.0], [-2.1, 0.1], [2.0, 0.0], [2.1, -0.1]])
    y = torch.tensor([0, 0, 1, 1])
    batches = [{"x": mu, "y": y, "idx": torch.arange(4)}]
    mem = GraphMemory.from_batches(lambda x: (x, torch.full((len(x), 2), 0.5)), batches, [], pool_rows=0,
                                   pool_size=100, seed=0, neighbours=10, alpha=0.9)
    assert mem.neighbours == 3 and len(mem.mu_NZ) == 4 and torch.equal(mem.weight_K, torch.ones(2, dtype=torch.double))
    q = mem.proba(torch.tensor([[-1.9, 0.0], [1.9, 0.0]]), torch.full((2, 2), 0.5))
    assert q.argmax(1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="neither labelled nor unlabelled"):
        GraphMemory.from_batches(lambda x: (x, x), [], [], 0, 10, 0, 10, 0.9)
