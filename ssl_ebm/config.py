"""The config tree: dataclasses, YAML loading with dotted overrides, strict validation.

Every field has a default, so a YAML file only states what differs. Unknown keys fail with the
dotted path and the nearest valid key; bad values fail with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says what to change."""


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def _choice(value: str, path: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, path, f"unknown value {value!r}; valid choices: {', '.join(choices)}")


ENCODERS = ("wrn", "conv", "mlp")
GENERATORS = ("deconv", "mlp")
LIKELIHOODS = ("gaussian", "multinomial", "mixed")
FEATURE_SCALINGS = ("standard", "quantile")  # vector data (ssl_ebm/features.py)
TABLE_DATASETS = ("table", "hf_disk")  # the shard sources that read columns (shards/sources.py)
TABLE_OPTIONS = ("label_column", "feature_columns", "categorical_columns", "drop_columns", "na_values", "separator",
                 "text_column")  # data.* options of those sources only
ACTIVATIONS = ("gelu", "relu", "leaky_relu", "elu", "silu", "tanh")
DECONV_SIZES = (28, 32)  # image sizes (H = W) the 4-layer deconvolutional generator produces


@dataclass
class ModelConfig:
    """The three networks and the latent space (paper section 3, eqs. 1-5)."""

    encoder: str = "mlp"  # q(z|x): "wrn" (Wide-ResNet, images), "conv" (small conv net, images) or "mlp" (vectors)
    generator: str = "mlp"  # p(x|z): "deconv" (4-layer, images) or "mlp" (vectors)
    likelihood: str = "gaussian"  # "gaussian" (fixed obs_sigma), "multinomial" (word counts) or "mixed" (tables)
    # "mixed": the (start, size) of each one-hot block of a table's vector, categorical there and Gaussian on
    # the other columns; launch/train.py fills it from the shard manifest's "columns" unless the config sets it
    categorical_blocks: tuple[tuple[int, int], ...] = ()
    x_shape: tuple[int, ...] = (64,)  # (D,) for vectors, (C, H, W) for images
    num_classes: int = 10  # K, the number of symbols y
    z_dim: int = 20  # d, the latent dimension
    hidden: int = 200  # hidden width of the MLP encoder and generator
    prior_hidden: int = 200  # hidden width of the prior MLP f(z)
    prior_activation: str = "gelu"
    activation: str = "gelu"  # activation of the MLP encoder and generator
    wrn_depth: int = 28  # WRN-d-k: d = 6n + 4
    wrn_width: int = 2  # WRN-d-k: k
    conv_channels: int = 32  # conv encoder: channels of its first layer (then 2x, 4x)
    conv_batchnorm: bool = True  # conv encoder: BatchNorm after its second and third convolution
    gen_channels: int = 64  # base channel width of the deconvolutional generator
    sigma0: float = 1.0  # p0(z) = N(0, sigma0^2 I)
    obs_sigma: float = 0.3  # std of the Gaussian likelihood x = g(z) + N(0, obs_sigma^2)
    labelled_weight: float = 1.0  # weight of the labelled cross-entropy (Algorithm 1, step 6)
    # Label smoothing of that cross-entropy (0 = the paper's): the few labelled examples can no longer drive
    # the logits f(z+), and with them F = logsumexp f and its Langevin drift, without bound.
    label_smoothing: float = 0.0
    # Learn one observation std per data dimension (with the generator, from obs_sigma, floored at
    # OBS_SIGMA_MIN) instead of the fixed obs_sigma: the balance of reconstruction against KL and F(z+) is
    # then set by the data rather than chosen per dataset. Gaussian and mixed likelihoods only.
    learn_obs_sigma: bool = False
    prior_spectral_norm: bool = False  # spectral normalisation of the prior's linear layers
    energy_penalty: float = 0.0  # weight of F(z+)^2 + F(z-)^2 (keeps energies bounded); trains the prior only (z+ detached)
    mi_weight: float = 0.0  # weight of the in-batch mutual information I(y; z+) (authors' code: 100; paper: 0)
    vat_weight: float = 0.0  # weight of a VAT smoothness term on f(mu(x)) over the unlabelled batch (not the paper; 0 = off)
    vat_xi: float = 0.1  # VAT: finite-difference step of the power iteration
    vat_eps: float = 0.1  # VAT: adversarial radius, times sqrt(D) (a per-feature RMS, as launch/baselines.py's VAT)
    # VAT in the latent space (not the paper; 0 = off): KL(softmax f(mu) || softmax f(mu + std * r_adv)) over the
    # unlabelled batch, std the posterior's, |r_adv| = latent_vat_eps (in posterior stds), xi = vat_xi
    latent_vat_weight: float = 0.0
    latent_vat_eps: float = 1.0
    # Pi-model consistency on f(mu(x)) over the unlabelled batch (not the paper; 0 = off): the mean squared
    # difference of softmax f(mu(x)) and softmax f(mu(x + n)), n ~ N(0, consistency_noise^2) per feature
    # (features are standardised), both passes with gradient (Laine & Aila's term, as launch/baselines.py's).
    consistency_weight: float = 0.0
    consistency_noise: float = 0.15
    # Entropy minimisation of softmax f(mu(x)) over the unlabelled batch (not the paper; 0 = off): the
    # classifier's boundaries pushed away from where the encoded data lie (Grandvalet & Bengio).
    entmin_weight: float = 0.0
    # Graph smoothing of the prediction over the latent space (not the paper; 0 = off: softmax f(mu), as the
    # paper classifies). The spreading weight alpha of label spreading over a graph of the labelled rows and
    # up to graph_pool unlabelled rows, each joined to its graph_neighbours nearest in mu-space; a new row
    # takes its neighbours' smoothed labels with weight alpha, its own f(mu) with 1 - alpha (ssl_ebm/graph.py).
    # Applied where ours is evaluated (validation, test); supervised-only never reads the unlabelled rows.
    graph_smoothing: float = 0.0
    graph_neighbours: int = 10
    graph_pool: int = 10000
    # Pseudo-labels from that graph during training (not the paper; 0 = off; Iscen et al. 2019's label
    # propagation for deep semi-supervised learning on our latent space): from update pseudo_label_start on,
    # every pseudo_label_every updates, the graph is rebuilt from the current weights; each unlabelled row of a
    # batch then takes the class its graph reading gives, weighted by that reading's certainty
    # (1 - entropy / log K), as a cross-entropy target for f(mu(x)). Needs model.graph_smoothing > 0 (alpha).
    pseudo_label_weight: float = 0.0
    pseudo_label_start: int = 500
    pseudo_label_every: int = 250

    def __post_init__(self) -> None:
        self.x_shape = tuple(self.x_shape)
        _choice(self.encoder, "model.encoder", ENCODERS)
        _choice(self.generator, "model.generator", GENERATORS)
        _choice(self.likelihood, "model.likelihood", LIKELIHOODS)
        _choice(self.prior_activation, "model.prior_activation", ACTIVATIONS)
        _choice(self.activation, "model.activation", ACTIVATIONS)
        _check(len(self.x_shape) in (1, 3) and all(s > 0 for s in self.x_shape), "model.x_shape",
               f"got {list(self.x_shape)}; use [D] for vectors or [C, H, W] for images")
        _check(self.num_classes >= 2, "model.num_classes", f"got {self.num_classes}; need at least 2 classes")
        _check(self.z_dim >= 1, "model.z_dim", f"got {self.z_dim}; must be >= 1")
        _check(self.hidden >= 1 and self.prior_hidden >= 1, "model.hidden", "widths must be >= 1")
        _check(self.sigma0 > 0, "model.sigma0", f"got {self.sigma0}; must be > 0")
        _check(not self.learn_obs_sigma or self.likelihood in ("gaussian", "mixed"), "model.learn_obs_sigma",
               f"learns the std of a Gaussian likelihood, but model.likelihood is {self.likelihood!r}; "
               "set model.learn_obs_sigma=false")
        _check(self.obs_sigma > 0, "model.obs_sigma", f"got {self.obs_sigma}; must be > 0")
        _check(self.labelled_weight >= 0, "model.labelled_weight", "must be >= 0")
        _check(0 <= self.label_smoothing < 1, "model.label_smoothing", f"got {self.label_smoothing}; must be in [0, 1)")
        _check(self.energy_penalty >= 0, "model.energy_penalty", "must be >= 0")
        _check(self.mi_weight >= 0, "model.mi_weight", "must be >= 0 (0 turns the mutual-information term off)")
        _check(self.vat_weight >= 0, "model.vat_weight", "must be >= 0 (0 turns the VAT term off)")
        _check(self.vat_xi > 0 and self.vat_eps > 0, "model.vat_eps", "vat_xi and vat_eps must be > 0")
        _check(self.latent_vat_weight >= 0 and self.latent_vat_eps > 0, "model.latent_vat_weight",
               "latent_vat_weight must be >= 0 (0 turns the term off) and latent_vat_eps > 0")
        _check(self.consistency_weight >= 0, "model.consistency_weight", "must be >= 0 (0 turns the term off)")
        _check(self.entmin_weight >= 0, "model.entmin_weight", "must be >= 0 (0 turns the term off)")
        _check(self.consistency_noise > 0, "model.consistency_noise", f"got {self.consistency_noise}; must be > 0")
        _check(0 <= self.graph_smoothing < 1, "model.graph_smoothing",
               f"got {self.graph_smoothing}; must be in [0, 1) (0 turns graph smoothing off)")
        _check(self.graph_neighbours >= 1, "model.graph_neighbours", f"got {self.graph_neighbours}; must be >= 1")
        _check(self.pseudo_label_weight >= 0, "model.pseudo_label_weight", "must be >= 0 (0 turns the term off)")
        _check(not self.pseudo_label_weight or self.graph_smoothing > 0, "model.pseudo_label_weight",
               "reads the graph of model.graph_smoothing, which is 0 (off); set model.graph_smoothing (e.g. 0.9) "
               "or model.pseudo_label_weight=0")
        _check(self.pseudo_label_start >= 1 and self.pseudo_label_every >= 1, "model.pseudo_label_every",
               "pseudo_label_start and pseudo_label_every must be >= 1")
        _check(self.graph_pool > self.graph_neighbours, "model.graph_pool",
               f"got {self.graph_pool}; must be more than model.graph_neighbours={self.graph_neighbours}")
        image = len(self.x_shape) == 3
        if self.encoder in ("wrn", "conv") or self.generator == "deconv":
            _check(image, "model.x_shape",
                   f"encoder {self.encoder!r} / generator {self.generator!r} need an image shape [C, H, W], "
                   f"got {list(self.x_shape)}")
        if self.generator == "deconv":
            h, w = self.x_shape[1:]
            _check(h == w and h in DECONV_SIZES, "model.x_shape",
                   f"got {list(self.x_shape)}; the deconv generator produces only "
                   f"{' or '.join(f'{s}x{s}' for s in DECONV_SIZES)} images: resize the data or use generator 'mlp'")
            _check(self.gen_channels >= 1, "model.gen_channels", f"got {self.gen_channels}; must be >= 1")
        if self.encoder == "conv":
            h, w = self.x_shape[1:]
            _check(h == w and h in DECONV_SIZES, "model.x_shape",
                   f"got {list(self.x_shape)}; the conv encoder reads only "
                   f"{' or '.join(f'{s}x{s}' for s in DECONV_SIZES)} images: resize the data or use encoder 'wrn'")
            _check(self.conv_channels >= 1, "model.conv_channels", f"got {self.conv_channels}; must be >= 1")
        if self.encoder == "wrn":
            _check((self.wrn_depth - 4) % 6 == 0 and self.wrn_depth >= 10, "model.wrn_depth",
                   f"got {self.wrn_depth}; WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...)")
            _check(self.wrn_width >= 1, "model.wrn_width", "must be >= 1")
        if self.likelihood == "multinomial":
            _check(not image, "model.likelihood", "the multinomial likelihood is for word-count vectors [V]")
        if self.likelihood == "mixed":
            _check(not image, "model.likelihood", "the mixed likelihood is for table vectors [D]")
            ends = sorted(self.categorical_blocks)
            _check(all(s >= 0 and n >= 2 and s + n <= self.x_shape[0] for s, n in ends)
                   and all(a + n <= b for (a, n), (b, _) in zip(ends, ends[1:])), "model.categorical_blocks",
                   f"got {[list(b) for b in self.categorical_blocks]}; each block [start, size] needs size >= 2, "
                   f"the blocks must not overlap and must lie inside the {self.x_shape[0]} columns")


@dataclass
class SamplerConfig:
    """Langevin sampling of the prior (eq. 6) and the persistent chains of Algorithm 1."""

    steps: int = 20  # T_LD
    step_size: float = 0.6  # s
    persistent: bool = True  # False: short-run chains restarted from p0 every step
    bank_size: int = 10_000  # persistent chains per process (L)
    num_chains: int = 0  # chains updated per step and process; 0 = the unlabelled batch size
    reinit_frac: float = 0.0  # fraction of drawn chains re-initialised from p0 before updating
    drift_clip: float = 0.0  # clip the norm of grad log p(z) per chain (0 = off)
    cuda_graph: bool = True  # on GPU, replay the T steps from one captured CUDA graph (same results as eager)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "sampler.steps", f"got {self.steps}; must be >= 0")
        _check(self.step_size > 0, "sampler.step_size", f"got {self.step_size}; must be > 0")
        _check(self.bank_size >= 1, "sampler.bank_size", "must be >= 1")
        _check(self.num_chains >= 0, "sampler.num_chains", "must be >= 0")
        _check(0.0 <= self.reinit_frac <= 1.0, "sampler.reinit_frac", "must be in [0, 1]")
        _check(self.drift_clip >= 0, "sampler.drift_clip", "must be >= 0 (0 turns it off)")
        if self.persistent:
            _check(self.num_chains <= self.bank_size, "sampler.num_chains",
                   f"got {self.num_chains} chains per step from a bank of {self.bank_size}; "
                   "lower num_chains or raise sampler.bank_size")


@dataclass
class DataConfig:
    """Where the shards are, and how batches are drawn from them.

    The fields from `dataset` to `text_column` say how to build the shards when they are missing (the
    options of `python -m shards.make`, under the same names); shards that exist must have been built with
    the same ones, or the run stops naming the option that differs. The column options are for
    `dataset: table` (a CSV or parquet file) and `hf_disk`; shards/make.py says how tables are encoded.
    """

    shards: str = ""  # fsspec URL of a shard directory holding manifest.json
    dataset: str = ""  # if set and the shards are missing, build them from this source first
    source: str = ""  # path of the source files for `dataset` (unused for digits)
    num_labelled: int = 100  # labelled examples, used when building shards
    balance: str = "balanced"  # the labelled set: "balanced" (equal per class) or "stratified" (a rare class)
    text: str = "counts"  # text datasets, when building shards: "counts" (unigram) or "embed" (sentence embeddings)
    vocab_size: int = 30_000  # text "counts", when building shards: most frequent training words kept
    features: str = "standard"  # vectors, when building shards: "standard" or "quantile" (ssl_ebm/features.py)
    label_column: str = ""  # tables: the label column ("" = "label")
    feature_columns: tuple[str, ...] = ()  # tables: the feature columns (empty = all but the label)
    categorical_columns: tuple[str, ...] = ()  # tables: columns one-hot encoded besides the string ones
    drop_columns: tuple[str, ...] = ()  # tables: columns left out of the features (e.g. one that leaks the label)
    na_values: tuple[str, ...] = ()  # tables: values that mean "missing" besides empty cells, e.g. [unknown, "?"]
    separator: str = ""  # tables: the CSV field separator ("" = detected from the file)
    text_column: str = ""  # tables: a text column (makes a text dataset)
    split_seed: int = 0  # seed of the labelled/unlabelled/validation split
    batch_unlabelled: int = 128
    batch_labelled: int = 32
    eval_batch: int = 512
    shuffle_buffer: int = 1000
    workers: int = 0
    cache_mb: int = 1024  # each reader keeps its part of the unlabelled stream in memory up to this size (0: off)

    def __post_init__(self) -> None:
        _check(self.batch_unlabelled >= 0 and self.batch_labelled >= 0, "data.batch_unlabelled",
               "batch sizes must be >= 0")
        _check(self.batch_unlabelled + self.batch_labelled > 0, "data.batch_labelled",
               "batch_unlabelled and batch_labelled cannot both be 0")
        _check(self.eval_batch >= 1, "data.eval_batch", "must be >= 1")
        _check(self.workers >= 0, "data.workers", "must be >= 0")
        _check(self.cache_mb >= 0, "data.cache_mb", "must be >= 0 (0 turns the in-memory cache off)")
        _check(self.num_labelled >= 1, "data.num_labelled", "must be >= 1")
        _choice(self.text, "data.text", ("counts", "embed"))
        _check(self.vocab_size >= 1, "data.vocab_size", "must be >= 1")
        _choice(self.features, "data.features", FEATURE_SCALINGS)
        _choice(self.balance, "data.balance", ("balanced", "stratified"))
        table_options = [k for k in TABLE_OPTIONS if getattr(self, k)]
        _check(not table_options or self.dataset in ("", *TABLE_DATASETS), f"data.{(table_options or [''])[0]}",
               f"is for data.dataset {' or '.join(TABLE_DATASETS)} (a CSV/parquet file or a saved Hugging Face "
               f"dataset); {self.dataset!r} reads its own files: remove it")
        both = sorted(set(self.drop_columns) & (set(self.categorical_columns) | set(self.feature_columns)))
        _check(not both, "data.drop_columns", f"{both} also named in data.categorical_columns or "
               "data.feature_columns; name each column in one of them")
        _check(not self.label_column or self.label_column not in self.drop_columns, "data.drop_columns",
               f"holds the label column {self.label_column!r}; remove it")


@dataclass
class OptimConfig:
    """Adam with one parameter group per part, and how the rates map to Algorithm 1's (eta_0, eta_1, eta_2).

    Algorithm 1 makes three updates per step; here one scalar loss carries all three and Adam takes one
    step with a rate per part: eta_0 (step 4, the prior on F(z+) - F(z-)) is lr_prior; eta_1 (step 5,
    encoder and generator on the ELBO) is lr_encoder and lr_generator, which may differ; eta_2 (step 6,
    the supervised step for prior and encoder) has no rate of its own: the cross-entropy is in the same
    loss, weighted by model.labelled_weight, and moves the prior at lr_prior and the encoder at lr_encoder
    (the generator gets no supervised gradient). With plain SGD that weight would be eta_2 / eta_0; Adam
    normalises the summed gradient, so it sets the supervised term's share of each step instead.
    """

    lr_prior: float = 1e-5  # eta_0 (Algorithm 1, step 4)
    lr_generator: float = 1e-3  # eta_1 for the generator (step 5)
    lr_encoder: float = 1e-3  # eta_1 for the encoder (step 5)
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    grad_clip: float = 0.0  # max global gradient norm (0 = off)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("lr_prior", "lr_generator", "lr_encoder"):
            _check(getattr(self, name) >= 0, f"optim.{name}", "learning rates must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "need two values in [0, 1)")
        _choice(self.schedule, "optim.schedule", ("constant", "cosine"))
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns it off)")


@dataclass
class TrainConfig:
    """The loop: how long, how often to log / evaluate / save, and where.

    A step is one optimizer update. With `grad_accum` = k each update runs k micro-batches of
    data.batch_unlabelled + data.batch_labelled examples per process, every one with its own negatives,
    forward, health check and backward, and applies the mean of their gradients (effective batch k times
    larger; DDP all-reduces once, on the last). `steps`, the LR schedule (`optim.warmup_steps`), the
    log / eval / image / checkpoint cadences, the watchdog's step numbers and early stopping all count
    updates, so a checkpoint always falls between windows and a stop signal finishes the window first.
    Under DeepSpeed, k fills the engine's gradient_accumulation_steps.

    `stop_after` = N pauses a run at update N of `steps`: it validates and checkpoints there, tests the
    checkpoint best on validation so far and writes metrics.json with "paused_at": N. The learning-rate
    schedule still spans `steps`, so the same command with stop_after=0 and resume=auto continues the run
    exactly where an uninterrupted one would be (`launch/reproduce.py --race` trains several
    initialisations this way and continues the best).
    """

    steps: int = 1000  # optimizer updates
    stop_after: int = 0  # pause after this many updates (0 = run to `steps`); see below
    seed: int = 0
    method: str = "ebm"  # "ebm" (Algorithm 1) or "supervised" (labelled loss only, same nets)
    mixed_precision: str = "no"  # "no" or "bf16" (autocast; the sampler stays fp32)
    grad_accum: int = 1  # micro-batches per update (see above)
    out_dir: str = "runs/default"  # fsspec URL of the run directory (config, logs, metrics)
    checkpoint_dir: str = ""  # fsspec URL for checkpoints; "" = <out_dir>/checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    resume: str = "auto"  # "auto" (newest complete checkpoint if any), "never", or a checkpoint URL
    allow_pickle: bool = False  # resume=<URL> outside checkpoint_dir: its .pt pickles run code; true if you trust it
    log_every: int = 50
    eval_every: int = 0  # steps between validation passes (0 = only at the end)
    image_every: int = 0  # steps between PNG grids for image data (0 = off)
    on_nan: str = "stop"  # with health.watchdog off: "stop" with the step number, or "skip" the update and count it
    max_nan_skips: int = 10
    progress: bool = True
    cpu_threads: int = 0  # torch intra-op threads on CPU (0 = torch's default); small MLPs run fastest on 1
    channels_last: bool = True  # on GPU, image nets and batches in channels_last memory format
    log_with: str = "tensorboard"  # Accelerate tracker(s), comma-separated: tensorboard, mlflow, wandb, ...; "none"
    ema_decay: float = 0.0  # > 0: validate, keep and test an exponential moving average of the weights (ssl_ebm/ema.py)
    # Which weights are tested at the end: "val" = those best on the validation split (passes every eval_every
    # updates and at the end); "final" = the weights at the end of training (their average with ema_decay),
    # and the validation split is never opened: what a user with only the labelled examples can do.
    select: str = "val"

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(0 <= self.stop_after <= self.steps, "train.stop_after",
               f"got {self.stop_after}; must be between 0 (run to train.steps) and train.steps ({self.steps})")
        _choice(self.method, "train.method", ("ebm", "supervised"))
        _choice(self.mixed_precision, "train.mixed_precision", ("no", "bf16"))
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.cpu_threads >= 0, "train.cpu_threads", "must be >= 0 (0 = torch's default)")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay",
               f"got {self.ema_decay}; must be in [0, 1): 0 = off, e.g. 0.999 to average over ~1,000 updates")
        _choice(self.on_nan, "train.on_nan", ("stop", "skip"))
        _choice(self.select, "train.select", ("val", "final"))
        _check(bool(self.log_with.strip()), "train.log_with",
               'empty; name an Accelerate tracker (tensorboard, mlflow, wandb, ...) or "none"')
        for name in ("checkpoint_every", "log_every", "eval_every", "image_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")


@dataclass
class HealthConfig:
    """Watching the dynamics: the divergence watchdog and early stopping (docs/HEALTH.md).

    Health metrics are logged every train.log_every steps whatever these say. The watchdog checks
    every step, on the batch means F(z+), F(z-), |z-| and the loss, at no extra host sync.
    """

    watchdog: bool = True  # on a crossed bound: restore the last good checkpoint, reset chains, apply the remedy
    max_abs_energy: float = 1000.0  # |F(z+)| or |F(z-)| (batch means) beyond this is divergence
    max_energy_gap: float = 10.0  # |F(z+) - F(z-)| beyond this: the chains no longer follow the prior (0 = off)
    max_chain_norm: float = 0.0  # mean |z-| beyond this is divergence; 0 = 5 x sigma0 * sqrt(z_dim)
    max_recoveries: int = 3  # recoveries per run before giving up with an error
    lr_prior_factor: float = 0.5  # the remedy: the prior's learning rate is multiplied by this per recovery
    patience: int = 0  # validation passes without a better accuracy before stopping early (0 = never)

    def __post_init__(self) -> None:
        _check(self.max_abs_energy > 0, "health.max_abs_energy", f"got {self.max_abs_energy}; must be > 0")
        _check(self.max_energy_gap >= 0, "health.max_energy_gap", f"got {self.max_energy_gap}; must be >= 0 (0 = off)")
        _check(self.max_chain_norm >= 0, "health.max_chain_norm",
               f"got {self.max_chain_norm}; must be >= 0 (0 = 5 x sigma0 * sqrt(z_dim))")
        _check(self.max_recoveries >= 0, "health.max_recoveries", f"got {self.max_recoveries}; must be >= 0")
        _check(0 < self.lr_prior_factor <= 1, "health.lr_prior_factor",
               f"got {self.lr_prior_factor}; must be in (0, 1] (1 restores without lowering the prior lr)")
        _check(self.patience >= 0, "health.patience", f"got {self.patience}; must be >= 0 (0 = no early stopping)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        if self.train.method == "ebm":
            _check(self.data.batch_unlabelled > 0, "data.batch_unlabelled",
                   "is 0, but train.method 'ebm' learns from unlabelled data; set data.batch_unlabelled > 0, "
                   "or train.method=supervised for the labelled-only baseline")
        else:
            _check(self.data.batch_labelled > 0, "data.batch_labelled",
                   "is 0, but train.method 'supervised' learns from labelled data only; set "
                   "data.batch_labelled > 0")
        _check(self.health.patience == 0 or self.train.eval_every > 0, "health.patience",
               "early stopping counts validation passes, but train.eval_every is 0 (validation only at the "
               "end); set train.eval_every or health.patience=0")
        _check(self.health.patience == 0 or self.train.select == "val", "health.patience",
               "early stopping counts validation passes, but train.select is 'final' (the validation split is "
               "never opened); set health.patience=0")


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples etc.)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), path, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), path, f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _check(isinstance(value, bool), path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), path,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), path,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), path, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), path, f"expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, path)
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(path + '.' if path else '') + near[0]!r}?" if near else ""
            raise ConfigError(f"{dotted}: unknown config key{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """`["train.steps=200", "--model.z_dim=8"]` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in items:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. train.steps=200")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (any fsspec URL or local path) and apply dotted overrides."""
    return from_dict(Config, raw_tree(path, overrides))


def raw_tree(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """The nested dict a config is built from: the YAML file with the overrides merged in.

    A file may start from another with `base: other.yaml` (a path relative to the file, or a URL): the
    base's tree is loaded first and the file's sections are merged over it, key by key. The training
    loop reads the tree to tell values the user set from defaults (for example `model.x_shape`, which
    is otherwise filled from the shard manifest).
    """
    data: dict = {}
    for _, tree in reversed(_chain(path) if path else []):  # the deepest base first, the file itself last
        data = _merge(data, tree)
    return _merge(data, parse_overrides(overrides or []))


def config_sources(path: str) -> list[str]:
    """The config file and the files it starts from (`base:`), the file itself first."""
    return [src for src, _ in _chain(path)]


def config_text(path: str) -> str:
    """The text of a config file and of every base it starts from: what a run of it depends on."""
    import fsspec

    texts = []
    for src in config_sources(path):
        with fsspec.open(src, "r") as f:
            texts.append(f.read())
    return "\n".join(texts)


def _base_path(path: str, base) -> str:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path!r}: base must be the path of another config file, got {base!r}")
    if "://" in base or os.path.isabs(base):
        return base
    head, sep, _ = path.rpartition("/")
    return f"{head}{sep}{base}" if sep else base


def _read_yaml(path: str, child: str = "") -> dict:
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        if child:
            raise ConfigError(f"config file {path!r}, the base of {child!r}, not found; fix the base: line "
                              f"of {child!r} (a path relative to that file)") from None
        raise ConfigError(f"config file {path!r} not found; pass --config with an existing YAML file "
                          "(see configs/)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, data:, ...)")
    return data


def _chain(path: str) -> list[tuple[str, dict]]:
    """(file, its tree without `base:`) for the config file and each base it starts from, the file first."""
    chain: list[tuple[str, dict]] = []
    while path is not None:
        seen = [src for src, _ in chain]
        if path in seen:
            raise ConfigError(f"config file {path!r} is its own base (through {' -> '.join(seen)}); "
                              "remove the loop of base: keys")
        data = _read_yaml(path, seen[-1] if seen else "")
        base = data.pop("base", None)
        chain.append((path, data))
        path = None if base is None else _base_path(path, base)
    return chain


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
