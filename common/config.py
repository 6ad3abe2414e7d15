"""The one typed run configuration, built in one place from the CLI or Flower's run config.

Every setting lives here once, with its default and its help text. ``sim/run.py``
builds its argument parser from these fields, the Flower ``ServerApp`` builds the same
object from ``context.run_config`` (kebab-case keys, as in ``[tool.flwr.app.config]``),
and the server sends it whole to every site inside each message, so that a site never
trains with settings the server did not log.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
PARTITIONS = ("subset", "iid", "dirichlet", "scanner")
ARCHS = ("resnet50", "resnet18", "resnet10")
DP_MODES = ("off", "local", "central")
MODES = ("federated", "centralized")
DEVICES = ("auto", "cpu", "cuda")
UPDATE_DTYPES = ("float32", "float16", "bfloat16")
LR_SCHEDULES = ("constant", "cosine", "step")
INJECTIONS = ("nan", "shape", "missing", "inflate", "signflip", "slow", "crash")


def _f(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


def default_home() -> Path:
    """Folder for made-on-first-use data and caches (``$LUNAFL_HOME`` or ``~/.cache/luna-fl``)."""
    return Path(os.environ.get("LUNAFL_HOME", Path.home() / ".cache" / "luna-fl"))


@dataclass(frozen=True)
class RunConfig:
    """All settings of one run (federated or centralized); see ``--help`` for each."""

    # --- what runs ---------------------------------------------------------------
    mode: str = _f("federated", "federated (Flower on Ray) or centralized (pooled baseline)", choices=MODES)
    clients: int = _f(8, "number of simulated hospitals (sites)")
    rounds: int = _f(8, "federated rounds (centralized: epochs = rounds x local-epochs)")
    local_epochs: int = _f(3, "local epochs per round at each site")
    # --- optimisation (the reference workload: Adam 1e-3, BCE, batch 16) ----------
    batch_size: int = _f(16, "training batch size")
    optimizer: str = _f("adam", "adam (the reference) or sgd (with --momentum; the usual choice under DP-SGD, "
                        "whose noise Adam rescales to full-size steps)", choices=("adam", "sgd"))
    lr: float = _f(1e-3, "learning rate")
    momentum: float = _f(0.9, "momentum of --optimizer sgd")
    train_params: str = _f("all", "weights that training updates: all, or norms+head (normalisation scales and "
                           "shifts and the classifier, ~55 k of 23.5 M: far less DP noise per step)",
                           choices=("all", "norms+head"))
    weight_decay: float = _f(0.0, "weight decay")
    lr_schedule: str = _f("constant", "learning rate over the whole run, by data pass (the same passes in a "
                          "federated and a centralized run): constant, cosine (down to 0 at the last pass) or "
                          "step (x0.1 at 1/2 and again at 3/4 of the passes)", choices=LR_SCHEDULES)
    warmup_passes: int = _f(0, "data passes of linear learning-rate warm-up before --lr-schedule")
    site_optimizer: str = _f("fresh", "each site's optimizer state (Adam's moments) at the start of a round: "
                             "fresh (zero, as Flower's examples do) or kept from the site's previous round (in "
                             "the site's state folder: site_state/ in simulation, state-path in deployment)",
                             choices=("fresh", "kept"))
    bn_stats: str = _f("sites", "BatchNorm running statistics of the final global model: sites (each site "
                       "re-estimates them for the final weights on its training patches and the server averages "
                       "them by patches: one more message per site at the end) or averaged (as local training left "
                       "them, averaged with the weights)", choices=("sites", "averaged"))
    fedbn: bool = _f(False, "FedBN: each site keeps its own normalisation layers (weights and running "
                     "statistics) across rounds; the server's model holds their average")
    neg_ratio: float = _f(3.0, "negatives drawn per positive in each training epoch (fresh each epoch)")
    augment: bool = _f(True, "training-only flips, 90-degree rotations and small shifts")
    # --- model --------------------------------------------------------------------
    arch: str = _f("resnet50", "torchvision ResNet with a one-logit head", choices=ARCHS)
    norm: str = _f("batch", "normalisation layers: batch (reference) or group (forced by --dp local)",
                   choices=("batch", "group"))
    weights: str = _f("", "local checkpoint to start from (a state_dict or our checkpoint); empty = random init")
    device: str = _f("auto", "auto (CUDA when present), cpu or cuda", choices=DEVICES)
    amp: bool = _f(True, "bfloat16 mixed precision and channels_last on CUDA and on CPUs with native bfloat16")
    # --- data ---------------------------------------------------------------------
    data: str = _f("", "LUNA16 root (subset0..9, annotations.csv, candidates_V2.csv); empty = synthetic")
    cache_dir: str = _f("", "patch cache folder; empty = <LUNAFL_HOME>/cache")
    synthetic_scans: int = _f(100, "scans of the default synthetic data set (made on first use)")
    image_size: int = _f(64, "patch side in pixels given to the model (224 = reference; smaller on CPU)")
    fov_mm: float = _f(48.0, "physical field of view of a patch in mm (same for every scan spacing)")
    hu_min: float = _f(-1000.0, "lower end of the HU window")
    hu_max: float = _f(400.0, "upper end of the HU window")
    max_neg_per_scan: int = _f(0, "cap on negatives cached per scan (0 = all; LUNA16 has ~850 per scan)")
    workers: int = _f(2, "processes building the patch cache")
    on_bad_scan: str = _f("skip", "a scan that cannot be read: skip it (and report) or fail the run",
                          choices=("skip", "fail"))
    # --- sites ----------------------------------------------------------------------
    partition: str = _f("iid", "how scans (patients) are assigned to sites", choices=PARTITIONS)
    alpha: float = _f(0.5, "Dirichlet concentration for --partition dirichlet (smaller = more skew)")
    test_subsets: str = _f("9", "LUNA16 subsets held out as the test split (comma list)")
    val_fraction: float = _f(0.2, "share of each site's patients kept for its local validation")
    # --- federation -------------------------------------------------------------------
    federation: str = _f("simulation", "simulation (sites are partitions of --data) or deployment (each "
                         "SuperNode reads its own data-path; --data, if given, is the server's test set)",
                         choices=("simulation", "deployment"))
    strategy: str = _f("fedavg", "Flower strategy", choices=STRATEGIES)
    fraction_fit: float = _f(1.0, "share of sites sampled for training each round")
    fraction_evaluate: float = _f(1.0, "share of sites sampled for federated evaluation each round")
    site_eval: str = _f("fused", "when sites evaluate the global model on their validation patches: fused (at "
                        "the start of the next round's training call, at every site sampled to train: no extra "
                        "message or weights download; the last round's model in its own phase) or separate "
                        "(Flower's evaluate phase after every round)", choices=("fused", "separate"))
    min_fit_clients: int = _f(0, "fewest valid updates a round needs (0 = half the sampled sites, at least 1)")
    proximal_mu: float = _f(0.01, "FedProx proximal term weight")
    server_lr: float = _f(0.0, "server learning rate of fedavgm / fedadam / fedyogi (0 = the usual value: 1.0 "
                          "for fedavgm, 0.01 for fedadam and fedyogi)")
    server_momentum: float = _f(0.9, "server momentum of fedavgm")
    trim_beta: float = _f(0.2, "fraction trimmed at each end by fedtrimmedavg")
    krum_malicious: int = _f(1, "number of malicious sites krum tolerates")
    round_timeout: float = _f(3600.0, "seconds a round waits for replies; late sites are left out")
    node_timeout: float = _f(300.0, "seconds to wait for enough sites to connect before failing")
    update_dtype: str = _f("float32", "dtype of weights on the wire (float16/bfloat16 halve traffic)",
                           choices=UPDATE_DTYPES)
    fail_prob: float = _f(0.0, "simulation only: chance that a site fails a round at random")
    inject: str = _f("", "simulation only, to rehearse attacks and faults: SITE:KIND pairs, e.g. "
                     "'site-2:nan,site-5:signflip' (kinds: nan, shape, missing, inflate, signflip, slow, crash)")
    # --- differential privacy -----------------------------------------------------------
    dp: str = _f("off", "off, local (Opacus DP-SGD at each site) or central (Flower server-side DP)",
                 choices=DP_MODES)
    dp_epsilon: float = _f(0.0, "target epsilon for the whole run (local DP; 0 = use --dp-noise)")
    dp_delta: float = _f(0.0, "delta (0 = 1/(10 x the site's training patches) for local DP, "
                         "1/(10 x sites) for central DP)")
    dp_noise: float = _f(1.0, "noise multiplier when no target epsilon is given")
    dp_clip: float = _f(1.0, "per-sample (local) or per-update (central) clipping norm")
    dp_grad_sample_mode: str = _f("ghost", "Opacus per-sample gradient mode (ghost = fast gradient clipping with "
                                  "our Conv2d norm sampler, the fastest measured)",
                                  choices=("ghost", "hooks", "functorch", "ew"))
    # --- resources --------------------------------------------------------------------------
    cpus_per_client: float = _f(1.0, "CPU cores reserved for each simulated site")
    gpus_per_client: float = _f(0.0, "GPU share of each simulated site (fractions share one GPU)")
    max_parallel: int = _f(0, "most sites training at once (0 = as many as resources allow)")
    ray_address: str = _f("", "attach to an existing Ray cluster (e.g. auto or 10.0.0.5:6379)")
    # --- bookkeeping --------------------------------------------------------------------------
    seed: int = _f(0, "seed for data, partitions, sampling and training")
    out: str = _f("runs", "folder that receives one results folder per run")
    run_name: str = _f("", "name of the results folder (empty = made from mode, strategy and time)")
    keep_checkpoints: int = _f(2, "global-model checkpoints kept (the newest N)")
    eval_every: int = _f(1, "evaluate on the test split every N rounds (and always after the last)")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                problems.append(f"--{_kebab(f.name)} {value!r}: choose one of {', '.join(choices)}")
        positive = ("clients", "rounds", "local_epochs", "batch_size", "image_size", "workers",
                    "eval_every", "keep_checkpoints")
        problems += [f"--{_kebab(n)} must be at least 1, got {getattr(self, n)}"
                     for n in positive if getattr(self, n) < 1]
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.server_lr < 0:
            problems.append(f"--server-lr must be >= 0 (0 = the strategy's usual value), got {self.server_lr}")
        if not 0.0 <= self.server_momentum < 1.0:
            problems.append(f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        if not 0 <= self.warmup_passes < self.rounds * self.local_epochs:
            problems.append(f"--warmup-passes must be in [0, rounds x local-epochs = "
                            f"{self.rounds * self.local_epochs}), got {self.warmup_passes}")
        if self.dp == "local" and (self.site_optimizer == "kept" or self.fedbn):
            problems.append("--dp local with --site-optimizer kept or --fedbn is not supported (Opacus rebuilds "
                            "the optimizer each round, and GroupNorm has no statistics to keep)")
        if not self.hu_min < self.hu_max:
            problems.append(f"--hu-min ({self.hu_min}) must be below --hu-max ({self.hu_max})")
        if not self.fov_mm > 0:
            problems.append(f"--fov-mm must be > 0, got {self.fov_mm}")
        for name in ("fraction_fit", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"--{_kebab(name)} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.fail_prob < 1.0:
            problems.append(f"--fail-prob must be in [0, 1), got {self.fail_prob}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.alpha <= 0:
            problems.append(f"--alpha must be > 0, got {self.alpha}")
        if self.neg_ratio <= 0:
            problems.append(f"--neg-ratio must be > 0, got {self.neg_ratio}")
        if self.dp == "local" and self.norm != "group":
            problems.append("--dp local needs --norm group (Opacus cannot train BatchNorm per sample)")
        if self.dp == "central" and self.norm != "group":
            problems.append("--dp central needs --norm group (server noise on BatchNorm's running variance "
                            "makes it negative and the model output NaN)")
        if self.dp == "local" and self.strategy == "fedprox":
            problems.append("--dp local with --strategy fedprox is not supported (Opacus' fast clipping wraps the "
                            "loss; choose fedavg or an adaptive server optimizer)")
        if self.dp == "central" and self.strategy in ("fedmedian", "krum", "fedtrimmedavg"):
            problems.append(f"--dp central wraps a mean-based strategy; {self.strategy} is not one")
        try:
            self.injections()
        except ValueError as exc:
            problems.append(str(exc))
        try:
            self.test_subset_list()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid run configuration:\n  " + "\n  ".join(problems))

    # --- derived values -------------------------------------------------------------
    def test_subset_list(self) -> tuple[int, ...]:
        """The held-out test subsets as integers."""
        try:
            out = tuple(sorted({int(s) for s in self.test_subsets.split(",") if s.strip()}))
        except ValueError:
            raise ValueError(f"--test-subsets {self.test_subsets!r}: expected a comma list of 0..9") from None
        if not out or any(s < 0 or s > 9 for s in out):
            raise ValueError(f"--test-subsets {self.test_subsets!r}: expected a comma list of 0..9")
        return out

    def injections(self) -> dict[str, str]:
        """``--inject`` as {site: kind}."""
        out = {}
        for item in filter(None, (x.strip() for x in self.inject.split(","))):
            site, _, kind = item.partition(":")
            if kind not in INJECTIONS:
                raise ValueError(f"--inject {item!r}: expected SITE:KIND with KIND one of {', '.join(INJECTIONS)}")
            out[site] = kind
        return out

    def data_passes(self, round_: int) -> int:
        """Passes over each site's (balanced) training data after ``round_`` rounds."""
        return round_ * self.local_epochs

    def server_lr_value(self) -> float:
        """``--server-lr``, or the chosen strategy's usual value when it is 0."""
        if self.server_lr > 0:
            return self.server_lr
        return 1.0 if self.strategy == "fedavgm" else 0.01

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_home() / "cache"

    def fingerprint(self, *names: str) -> str:
        """Short hash of the named settings (all when none are named)."""
        d = self.to_dict()
        chosen = {k: d[k] for k in (names or d)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]

    # --- conversions ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case keys, as Flower's ``run_config`` and ``pyproject.toml`` use them."""
        return {_kebab(k): v for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from snake_case or kebab-case keys; unknown keys are an error naming them."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            name = key.replace("-", "_")
            if name not in known:
                unknown.append(key)
                continue
            kwargs[name] = _coerce(known[name], value)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(_kebab(n) for n in known)}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"--{_kebab(f.name)}: expected true or false, got {value!r}")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{_kebab(f.name)}: expected {kind.__name__}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one ``--kebab-name`` option per config field (or only those named)."""
    for f in fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        opt = "--" + _kebab(f.name)
        help_ = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(opt, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(opt, type=type(f.default), default=None,
                                choices=f.metadata.get("choices"), help=help_, metavar=None
                                if f.metadata.get("choices") else f.name.split("_")[-1].upper())


def from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The config with every option the user gave on the command line applied."""
    base = base or RunConfig()
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    return RunConfig.from_dict({**base.to_dict(), **given})
