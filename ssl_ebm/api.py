"""Using a trained model: load it from any fsspec URL, predict, encode, sample, generate, score; export it.

    import ssl_ebm
    model = ssl_ebm.load("runs/digits/checkpoints/best-000900", allow_pickle=True)  # a checkpoint
    model = ssl_ebm.load("memory://exported/digits")                                # an exported folder
    model.predict(x)                  # class indices; x in the data's own units (pixels, raw features)
    z = model.sample(16, y=3)         # 16 latents of class 3 (Langevin on f_3(z) - |z|^2 / (2 sigma0^2))
    x = model.generate(z)             # back in the data's own units
    model.score(x_new)                # out-of-distribution scores (higher = less like the training data)
    ssl_ebm.export(model, "s3://bucket/models/digits")  # config + manifest + model.safetensors (+ graph.safetensors)

Inputs are tensors or arrays in the units of the source data: images as pixels (N, H, W[, C]) in
0..255, vectors as the raw features (standardised here with the training shards' mean and std), text
as word counts (N, V). A model trained on a table (CSV, parquet: the manifest's "columns" record) also
takes its raw rows as a pandas DataFrame, by column name: strings, categories and missing values are
encoded as the shard writer encoded the table (`from_table`). Outputs are CPU tensors. Every method
works `model.batch_size` (1024) examples or chains at a time: each slice of the input is scaled, moved
to the device, used and its outputs moved back before the next, so memory on the device does not grow
with N. A checkpoint directory is a torch pickle (`model.pt`, loaded with weights_only=False:
unpickling runs whatever code the file names), so `load` reads one only when told `allow_pickle=True`;
an exported folder holds `model.safetensors` and JSON/YAML, and loads without unpickling anything.

Shapes: N examples, Z latent dim, K classes.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import torch
import yaml

from ssl_ebm import config as C
from ssl_ebm import features
from ssl_ebm.graph import GraphMemory, encode
from ssl_ebm.langevin import langevin
from ssl_ebm.likelihood import kl_to_p0
from ssl_ebm.model import LatentEBM

WEIGHTS = "model.safetensors"
GRAPH = "graph.safetensors"  # model.graph_smoothing's graph (ssl_ebm/graph.py), where the model has one
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
# What a model needs from the shard manifest to take and give data in its own units.
MANIFEST_KEYS = ("dataset", "kind", "x_shape", "stored_shape", "num_classes", "class_names", "normalisation", "vocab",
                 "feature_names", "columns", "na_values")
# Out-of-distribution scores, each "higher = less like the training data".
SCORES = ("neg_F", "energy", "neg_elbo", "neg_max_softmax")


class ModelError(ValueError):
    """A model URL, file or input that cannot be used; the message says what to do."""


class PickleRefused(ModelError):
    """The URL holds a pickled checkpoint and the caller did not pass allow_pickle=True."""


# ----------------------------------------------------------------------------- loading


def _fs(url: str):
    try:
        return fsspec.core.url_to_fs(url.rstrip("/"))
    except (ImportError, ValueError) as e:
        raise ModelError(f"{url!r} cannot be opened: {e}") from None


def _read(fs, path: str, url: str, what: str) -> bytes:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelError(f"{url}: {what} is missing; the folder is incomplete: export the model again") from None


def load(url: str, *, allow_pickle: bool = False, shards: str = "", device: str | torch.device = "cpu") -> "Model":
    """A trained model from `url`: an exported folder (model.safetensors) or a checkpoint directory.

    `allow_pickle=True` is needed for a checkpoint directory (its model.pt is a pickle: only load ones you
    trust). `shards`: the shard directory whose manifest gives class names and normalisation, for a
    checkpoint whose training shards have moved (an exported folder carries them itself).
    """
    url = url.rstrip("/")
    if url.endswith("/model.pt"):
        url = url.rsplit("/", 1)[0]
    fs, root = _fs(url)
    if fs.exists(f"{root}/{WEIGHTS}"):
        from safetensors.torch import load as load_safetensors

        cfg = _config(_read(fs, f"{root}/{CONFIG}", url, CONFIG), url)
        manifest = json.loads(_read(fs, f"{root}/{MANIFEST}", url, MANIFEST))
        try:
            weights = load_safetensors(_read(fs, f"{root}/{WEIGHTS}", url, WEIGHTS))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"{url}/{WEIGHTS} is not a readable safetensors file ({e}); export the model again") from None
        graph = None
        if cfg.model.graph_smoothing > 0 and cfg.train.method == "ebm":  # the graph its prediction reads
            try:
                graph = GraphMemory.from_state_dict(load_safetensors(_read(fs, f"{root}/{GRAPH}", url, GRAPH)),
                                                    cfg.model.graph_neighbours, cfg.model.graph_smoothing)
            except ModelError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; a key may be missing
                raise ModelError(f"{url}/{GRAPH} is not a readable graph ({e}); export the model again") from None
        return Model(_build(cfg, weights, url), cfg, manifest, device, graph=graph)
    if fs.exists(f"{root}/model.pt") or (fs.exists(root) and not fs.isdir(root)):
        what = f"{url}/model.pt" if fs.exists(f"{root}/model.pt") else url
        if not allow_pickle:
            raise PickleRefused(
                f"{what} is a pickled checkpoint: unpickling it runs any code it names. Load an exported folder "
                "(ssl_ebm.export or `python launch/export.py CHECKPOINT OUT --allow-pickle`) or, for a "
                "checkpoint you trust, pass allow_pickle=True (--allow-pickle on the command line)")
        if what == url:
            raise ModelError(f"{url} is a file; pass a checkpoint directory (.../best-NNNNNN) or an exported folder")
        return _load_checkpoint(url, shards, device)
    if not fs.exists(root):
        raise ModelError(f"{url}: no such checkpoint or model folder")
    raise ModelError(f"{url} holds neither {WEIGHTS} (an exported model) nor model.pt (a checkpoint)")


def _config(text: bytes, url: str) -> C.Config:
    try:
        return C.from_dict(C.Config, yaml.safe_load(text))
    except (yaml.YAMLError, C.ConfigError) as e:
        raise ModelError(f"{url}/{CONFIG} is not a valid ssl-ebm config ({e})") from None


def _build(cfg: C.Config, weights: dict, url: str) -> LatentEBM:
    net = LatentEBM(cfg.model)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelError(f"{url}: the weights do not fit the model its config describes ({str(e).splitlines()[0]})") from None
    return net.eval()


def _load_checkpoint(url: str, shards: str, device) -> "Model":
    from ssl_ebm import data
    from ssl_ebm.checkpoint import CheckpointError, load_weights

    fs, root = _fs(url)
    try:
        weights = load_weights(url)  # checks COMPLETE
    except CheckpointError as e:
        raise ModelError(str(e)) from None
    if not fs.exists(f"{root}/{CONFIG}"):
        raise ModelError(f"{url} has no {CONFIG}; it was not written by launch/train.py")
    cfg = _config(_read(fs, f"{root}/{CONFIG}", url, CONFIG), url)
    shards = shards or cfg.data.shards
    try:
        manifest = data.read_manifest(shards)
    except data.DataError as e:
        if len(cfg.model.x_shape) != 3:
            raise ModelError(f"{url}: the training shards' manifest ({shards}) cannot be read, and this model "
                             f"needs its normalisation: pass shards=URL of the shard directory ({e})") from None
        manifest = {}  # images: pixels, the same for every image dataset
    net = _build(cfg, weights, url)
    graph = None
    if cfg.model.graph_smoothing > 0 and cfg.train.method == "ebm":  # rebuilt as training's evaluation built it
        try:
            with torch.no_grad():
                graph = GraphMemory.from_shards(net.to(device), shards, cfg, device)
        except (data.DataError, KeyError, ValueError) as e:
            raise ModelError(f"{url}: this model predicts with graph smoothing (model.graph_smoothing), built from "
                             f"its training shards' labelled and unlabelled rows, which cannot be read at {shards}: "
                             f"pass shards=URL of the shard directory ({e})") from None
    return Model(net, cfg, manifest, device, graph=graph)


def export(model: "Model", url: str) -> str:
    """Write `model` to the folder `url` (any fsspec URL): config.yaml, manifest.json, model.safetensors.

    The weights go last, so a folder whose export was interrupted is not taken for a model. Returns `url`.
    """
    from safetensors.torch import save as save_safetensors

    url = url.rstrip("/")
    fs, root = _fs(url)
    if fs.exists(f"{root}/{WEIGHTS}"):
        fs.rm(f"{root}/{WEIGHTS}")
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    meta = {"format": "pt", "producer": "ssl-ebm"}
    files = [(CONFIG, C.dump_config(model.cfg).encode()), (MANIFEST, json.dumps(model.manifest, indent=1).encode())]
    if model.graph is not None:
        files.append((GRAPH, save_safetensors(model.graph.state_dict(), metadata=meta)))
    elif fs.exists(f"{root}/{GRAPH}"):
        fs.rm(f"{root}/{GRAPH}")
    for filename, blob in (*files, (WEIGHTS, save_safetensors(state, metadata=meta))):
        with fs.open(f"{root}/{filename}", "wb") as f:
            f.write(blob)
    return url


# ----------------------------------------------------------------------------- the model


class _ClassEnergy:
    """F(z) + w (f_y(z) - F(z)) = log p(z) + w log p(y | z) + c, one class per chain: the negative energy
    Langevin climbs. w = 1 is the model's own p(z | y) ∝ exp(f_y(z)) p0(z); w > 1 weighs the class
    posterior more (classifier guidance)."""

    def __init__(self, prior, y_N: torch.Tensor, guidance: float = 1.0):
        self.prior, self.y_N1, self.w = prior, y_N[:, None], guidance

    def free_energy(self, z_NZ: torch.Tensor) -> torch.Tensor:
        f_NK = self.prior(z_NZ)
        f_y_N = f_NK.gather(1, self.y_N1).squeeze(1)
        if self.w == 1.0:
            return f_y_N
        F_N = torch.logsumexp(f_NK, dim=1)
        return F_N + self.w * (f_y_N - F_N)


class Model:
    """A trained LatentEBM with the manifest facts that map the data's own units to the model's and back."""

    def __init__(self, net: LatentEBM, cfg: C.Config, manifest: dict, device: str | torch.device = "cpu",
                 batch_size: int = 1024, graph: GraphMemory | None = None):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.cfg = cfg
        self.graph = graph  # model.graph_smoothing: the prediction reads it (ssl_ebm/graph.py)
        mc = cfg.model
        kind = "image" if len(mc.x_shape) == 3 else "counts" if mc.likelihood == "multinomial" else "vector"
        manifest = {"feature_names": (manifest.get("source") or {}).get("feature_names"), **manifest}
        if manifest.get("columns"):  # a table's: what from_table needs to read raw rows as the shard writer did
            manifest.setdefault("na_values", (manifest.get("build_options") or {}).get("na_values") or [])
        self.manifest = {k: manifest[k] for k in MANIFEST_KEYS if manifest.get(k) is not None}
        self.manifest.setdefault("kind", kind)
        self.manifest.setdefault("x_shape", list(mc.x_shape))
        self.manifest.setdefault("num_classes", mc.num_classes)
        if len(mc.x_shape) == 3:
            self.manifest.setdefault("stored_shape", [mc.x_shape[1], mc.x_shape[2], mc.x_shape[0]])
        if tuple(self.manifest["x_shape"]) != tuple(mc.x_shape) or self.manifest["num_classes"] != mc.num_classes:
            raise ModelError(f"the manifest describes {self.manifest['x_shape']} examples in "
                             f"{self.manifest['num_classes']} classes, the model takes {list(mc.x_shape)} in "
                             f"{mc.num_classes}: pass the shards the model was trained on")
        self.kind = self.manifest["kind"]
        self.class_names = list(self.manifest.get("class_names") or [str(k) for k in range(mc.num_classes)])
        self.batch_size = batch_size

    def __repr__(self) -> str:
        mc = self.cfg.model
        return (f"Model({self.manifest.get('dataset', '?')}: {self.kind} {list(mc.x_shape)}, {mc.num_classes} classes, "
                f"z_dim {mc.z_dim}, encoder {mc.encoder}, generator {mc.generator})")

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    @property
    def z_dim(self) -> int:
        return self.cfg.model.z_dim

    # ------------------------------------------------------------------ units
    def _check_shape(self, shape: tuple[int, ...]) -> None:
        """The input's shape (N, ...) against the model's, before anything is converted."""
        model_shape = tuple(self.cfg.model.x_shape)
        if len(model_shape) == 3:  # images: pixels (N, H, W[, C])
            c, h, w = model_shape
            if not (shape[1:] == (h, w, c) or (c == 1 and shape[1:] == (h, w))):
                raise ModelError(f"x has shape {shape}; expected images (N, {h}, {w}{'' if c == 1 else f', {c}'}) "
                                 "of pixels in 0..255, as in the source data")
        elif len(shape) != 2 or shape[1] != model_shape[0]:
            raise ModelError(f"x has shape {shape}; expected (N, {model_shape[0]}) for this model")

    def to_model_units(self, x) -> torch.Tensor:
        """Examples in the data's own units -> float32 (N, *model.x_shape) on the model's device, as the loaders
        give. All of `x` at once: the methods below convert theirs batch by batch (`_batches`). A table's model
        also takes a DataFrame of its raw rows (`from_table`)."""
        if self._is_table(x):
            x = self.from_table(x)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_:
            raise ModelError(f"x is {x.dtype}; expected numbers in the data's own units")
        self._check_shape(x.shape)
        if len(self.cfg.model.x_shape) == 3:  # images: pixels (N, H, W[, C]) in 0..255 -> (N, C, H, W) in [-1, 1]
            x = x.reshape(*x.shape[:3], -1)
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
        else:
            if self.kind == "vector" and not np.isfinite(x).all():  # before scaling: quantiles clip inf
                raise ModelError("x holds NaN or infinite values")
            x = features.to_model(x, self.manifest.get("normalisation") or {}) if self.kind == "vector" \
                else x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ModelError("x holds NaN or infinite values")
        return torch.from_numpy(x).to(self.device)

    def to_data_units(self, x_model: torch.Tensor) -> torch.Tensor:
        """The generator's mean output -> the data's own units: uint8 pixels (N, H, W, C), de-standardised
        features (N, D), or word probabilities (N, V) for text."""
        x_model = x_model.detach().float().cpu()
        if self.kind == "image":
            return x_model.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        if self.kind == "counts":
            return torch.softmax(x_model, dim=-1)
        return torch.from_numpy(features.to_data(x_model.numpy(), self.manifest.get("normalisation") or {})).float()

    def from_table(self, frame) -> np.ndarray:
        """A table's raw rows (a pandas DataFrame with the table's feature columns, by name; others are ignored)
        -> (N, width) float64 vectors in data units, encoded as the shard writer encoded the table's rows, by the
        manifest's "columns" record (ssl_ebm/features.py, encode_columns): a missing number (NaN, None, a
        na_values marker) becomes the training pool's median, with 1 in its "is missing" column if it has one;
        a category becomes its one-hot slot, one the training pool never had the "(unseen)" slot of its block."""
        record = self.manifest.get("columns")
        if not record:
            raise ModelError("x is a DataFrame, but this model was not trained on a table's columns (its manifest has "
                             "no 'columns' record); pass its vectors (N, D) as numbers")
        frame = frame.rename(columns=str)
        names = [c["name"] for c in record["numeric"]] + [b["name"] for b in record["categorical"]]
        lacking = [n for n in names if n not in frame.columns]
        if lacking:
            raise ModelError(f"x lacks the table column(s) {lacking[:5]} the model was trained on; give a DataFrame "
                             f"with its columns {names[:20]}")
        na = self.manifest.get("na_values") or []
        numeric = [table_numbers(frame[c["name"]], na) for c in record["numeric"]]
        categorical = [category_names(frame[b["name"]], na) for b in record["categorical"]]
        return features.encode_columns(np.stack(numeric, 1) if numeric else np.zeros((len(frame), 0)),
                                       np.stack(categorical, 1) if categorical else None, record)

    def _is_table(self, x) -> bool:
        """x is a table's raw rows: a DataFrame, for a model trained on a table."""
        return bool(self.manifest.get("columns")) and hasattr(x, "columns") and hasattr(x, "iloc")

    def _batches(self, x):
        """`x` in model units on the device, batch_size examples at a time: each slice of the caller's array is
        converted (scaled in float64), moved and used before the next, so the device and the scaling hold one
        batch, never all N (1M CIFAR images would be 12 GB of float32)."""
        if self._is_table(x):  # raw table rows: encoded a batch at a time, too
            for i in range(0, len(x), self.batch_size):
                yield self.to_model_units(x.iloc[i:i + self.batch_size])
            return
        x = x if isinstance(x, (torch.Tensor, np.ndarray)) else np.asarray(x)
        self._check_shape(tuple(x.shape))
        for i in range(0, len(x), self.batch_size):
            yield self.to_model_units(x[i:i + self.batch_size])

    def _cat(self, parts: list[torch.Tensor], *tail: int) -> torch.Tensor:
        """The per-batch outputs, each already moved to the host, as one CPU tensor."""
        return torch.cat(parts) if parts else torch.zeros((0, *tail))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_proba(self, x) -> torch.Tensor:
        """p(y | x) = softmax(f(mu(x))), (N, K) (eq. 12 with q(z|x) replaced by its mean); for a model trained
        with model.graph_smoothing, that smoothed over the training pool's graph, as its evaluation scored it."""
        return self._cat([self.proba_of(b).float().cpu() for b in self._batches(x)], self.num_classes)

    def proba_of(self, x_model: torch.Tensor) -> torch.Tensor:
        """predict_proba of rows already in model units on the device: softmax f(mu), or its graph smoothing."""
        if self.graph is not None:
            return self.graph.proba(*encode(self.net, x_model))
        return self.net.predict_proba(x_model)

    def predict(self, x) -> torch.Tensor:
        """argmax_y f_y(mu(x)), (N,) class indices (names: self.class_names)."""
        return self.predict_proba(x).argmax(1)

    @torch.no_grad()
    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): its mean mu and log-variance, each (N, Z)."""
        out = [[t.float().cpu() for t in self.net.encoder(b)] for b in self._batches(x)]
        return self._cat([m for m, _ in out], self.z_dim), self._cat([v for _, v in out], self.z_dim)

    # ------------------------------------------------------------------ generation
    def sample(self, n: int, y=None, *, steps: int = 200, step_size: float | None = None,
               seed: int | None = None, guidance: float = 1.0) -> torch.Tensor:
        """n latents z (N, Z) by Langevin from p0 (eq. 6): on log p(z) = F(z) - |z|^2/(2 sigma0^2), or, given
        a class y (an index, a name, or one per sample), on log p(z | y) = f_y(z) - |z|^2/(2 sigma0^2) + c.

        `steps` from p0 (200: well past the 20 that training's persistent chains take per update),
        `step_size` (default: the training config's), `seed` for a reproducible draw. `guidance` w (with y)
        samples log p(z) + w log p(y | z) instead: w = 1 (the default) is the model's p(z | y) exactly;
        w > 1 trades diversity for samples the prior's classifier is surer of, as classifier guidance does.

        The chains run `batch_size` at a time (memory on the device is bounded by it, not by n): each batch
        starts from p0 and takes its steps before the next, all drawing in turn on the one seeded generator.
        So a seed gives the same draw for the same n and batch_size; n <= batch_size is one batch.
        """
        if n < 0:
            raise ModelError(f"n must be >= 0, got {n}")
        if not guidance > 0:
            raise ModelError(f"guidance must be > 0 (1 = the model's own p(z | y)), got {guidance}")
        mc = self.cfg.model
        y_N = self._labels(y, n) if y is not None else None
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        parts = []
        for i in range(0, n, self.batch_size):
            b = min(self.batch_size, n - i)
            z0 = mc.sigma0 * (torch.randn((b, mc.z_dim), generator=gen, device=self.device))
            energy = self.net.prior
            if y_N is not None:
                energy = _ClassEnergy(self.net.prior, y_N[i:i + b].to(self.device), guidance)
            z = langevin(energy, z0, steps=steps, step_size=step_size or self.cfg.sampler.step_size, sigma0=mc.sigma0,
                         generator=gen)
            parts.append(z.cpu())
        return self._cat(parts, self.z_dim)

    def _labels(self, y, n: int) -> torch.Tensor:
        if isinstance(y, str):
            if y not in self.class_names:
                raise ModelError(f"unknown class {y!r}; the classes are {', '.join(self.class_names)}")
            y = self.class_names.index(y)
        y_N = torch.as_tensor(y, dtype=torch.int64).reshape(-1)
        if y_N.numel() == 1:
            y_N = y_N.expand(n)
        if y_N.numel() != n:
            raise ModelError(f"y has {y_N.numel()} classes for {n} samples; give one class or one per sample")
        if n and (y_N.min() < 0 or y_N.max() >= self.num_classes):
            raise ModelError(f"class indices must be in [0, {self.num_classes}), got {y_N.min()}..{y_N.max()}")
        return y_N  # where the caller's labels are; `sample` moves them to the device a batch at a time

    @torch.no_grad()
    def generate(self, z) -> torch.Tensor:
        """x = g(z), the generator's mean, in the data's own units (see to_data_units)."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ModelError(f"z has shape {tuple(z.shape)}; expected (N, {self.z_dim})")
        if not len(z):
            return self.to_data_units(torch.zeros((0, *self.cfg.model.x_shape)))
        return torch.cat([self.to_data_units(self.net.generator(z[i:i + self.batch_size].to(self.device)))
                          for i in range(0, len(z), self.batch_size)])  # each batch back to the host as it is made

    # ------------------------------------------------------------------ out-of-distribution scores
    @torch.no_grad()
    def score(self, x, *, elbo_samples: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Out-of-distribution scores, (N,) each, higher = less like the training data:

        "neg_F":           -F(mu(x)), F = logsumexp f (eq. 5) at the inferred latent: the tilt the EBM adds
                           to p0. Unbounded where f extrapolates, so inputs far from any data (noise) can
                           land at a large F and look in-distribution;
        "energy":          -F(mu) + |mu|^2 / (2 sigma0^2) = -log p_alpha(mu(x)) + const, the prior's full
                           energy at the inferred latent (eq. 4): the same with the base measure p0;
        "neg_elbo":        -[E_q log p(x|z) + E_q F(z) - KL(q(z|x) || p0)], the negative ELBO under the
                           EBM prior up to its constant log Z (eq. 11), from `elbo_samples` draws of q;
        "neg_max_softmax": -max_y p(y | x), the classifier baseline.
        """
        mc = self.cfg.model
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        out = {k: [] for k in SCORES}
        for x_B in self._batches(x):
            mu, logvar = (t.float() for t in self.net.encoder(x_B))
            logits = self.net.prior(mu)
            neg_F = -torch.logsumexp(logits, dim=-1)
            out["neg_F"].append(neg_F)
            out["energy"].append(neg_F + mu.pow(2).sum(1) / (2 * mc.sigma0**2))
            out["neg_max_softmax"].append(-torch.softmax(logits, dim=-1).max(1).values)
            elbo = -kl_to_p0(mu, logvar, mc.sigma0)
            for _ in range(elbo_samples):
                eps = torch.randn(mu.shape, generator=gen, device=self.device)
                z = mu + torch.exp(0.5 * logvar) * eps
                elbo = elbo + (self.net.log_px(x_B, z) + self.net.prior.free_energy(z)) / elbo_samples
            out["neg_elbo"].append(-elbo)
            for v in out.values():
                v[-1] = v[-1].cpu()
        return {k: self._cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- a table's raw values


def _missing(column, na_values: list[str]) -> np.ndarray:
    """Where a table column's values are missing: NaN, None, pd.NA, or a na_values marker, as text or as the number
    it spells (as pandas reads a CSV's markers)."""
    import pandas as pd

    missing = column.isna()
    if na_values:
        numbers = pd.to_numeric(pd.Series(list(na_values)), errors="coerce").dropna().tolist()
        missing = missing | column.astype(str).isin(na_values) | column.isin(numbers)
    return missing.to_numpy(dtype=bool)


def table_numbers(column, na_values: list[str] = ()) -> np.ndarray:
    """A numeric table column (a pandas Series) as float64, NaN where missing; a value that is not a number is
    refused."""
    import pandas as pd

    missing = _missing(column, list(na_values))
    values = pd.to_numeric(column.mask(missing), errors="coerce")
    wrong = values.isna().to_numpy(dtype=bool) & ~missing
    if wrong.any():
        raise ModelError(f"x column {column.name!r} holds {column[wrong].iloc[0]!r}, not a number; the model reads "
                         "it as numbers: give numbers, or NaN where one is missing")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def category_names(column, na_values: list[str] = ()) -> np.ndarray:
    """A categorical table column (a pandas Series) as the category names the table reader gives its values
    (shards/sources.py), by the same features.category_name; None where missing. Object array (N,)."""
    missing = _missing(column, list(na_values))
    names = [None if m else features.category_name(v) for v, m in zip(column.to_numpy(dtype=object), missing)]
    return np.array(names, dtype=object)


def read_examples(url: str, split: str = "test", limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of one split of a shard directory in the data's own units, with their labels: what
    `Model` methods take, whichever dataset the shards hold (each shard directory's own normalisation is
    undone, so another dataset's shards can be scored by a model). `limit` > 0 keeps the first `limit`."""
    from ssl_ebm import data

    manifest = data.read_manifest(url)
    xs, ys, n = [], [], 0
    for b in data.eval_batches(url, split, batch_size=1024):
        xs.append(b["x"])
        ys.append(b["y"])
        n += len(b["y"])
        if limit and n >= limit:
            break
    x = torch.cat(xs) if xs else torch.zeros((0, *manifest["x_shape"]))
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    if manifest["kind"] == "image":
        return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), y
    if manifest["kind"] == "vector":
        x = torch.from_numpy(features.to_data(x.numpy(), manifest.get("normalisation") or {}))
    return x, y


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve separating out-of-distribution (positive) from in-distribution examples by
    a score that is higher out of distribution: the probability that an "out" example scores above an "in" one."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    if not len(a) or not len(b):
        raise ModelError("AUROC needs at least one in-distribution and one out-of-distribution score")
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))
