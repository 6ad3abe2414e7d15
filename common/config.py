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

from common.evaluation.metrics import OPERATING_RULES

# The strategies by name, each with the settings of its own: the one list the CLI's choices and
# help, the config check, the Flower app table and the README's strategy table follow;
# server/strategies.py builds each (a test keeps its builders and this table in step).
STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedavgm": ("server_lr", "server_momentum"),
    "fedadam": ("server_lr",),
    "fedyogi": ("server_lr",),
    "fedmedian": (),
    "fedtrimmedavg": ("trim_beta",),
    "krum": ("krum_malicious",),
}
STRATEGIES = tuple(STRATEGY_SETTINGS)
# FedAvgM's default server learning rate: the server steps FEDAVGM_SERVER_LR times the sites'
# weighted mean change. 2 gained test ROC-AUC over plain FedAvg (lr 1) on every one of three seeds
# of the demo (README, "Closing the gap").
FEDAVGM_SERVER_LR = 2.0
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")  # Flower's central-DP accountant needs FedAvg's own mean
PARTITIONS = ("subset", "iid", "dirichlet", "scanner")
ARCHS = ("resnet50", "resnet18", "resnet10")  # built by common.training.model.LAYERS (a test keeps them in step)
TRAIN_PARAMS = ("all", "norms+head")  # which weights training updates (common.training.model.set_trainable)
DP_MODES = ("off", "local", "central")
MODES = ("federated", "centralized")
DEVICES = ("auto", "cpu", "cuda")
UPDATE_DTYPES = ("float32", "float16", "bfloat16")
# Settings a hospital may require of every run (node config / LUNAFL_PIN); the handshake refuses
# a run that differs (client/app.py sends them, server/federation.py compares).
PINNABLE = ("image-size", "dp", "arch", "norm")
LR_SCHEDULES = ("constant", "cosine", "step")
INJECTIONS = ("nan", "shape", "missing", "inflate", "signflip", "slow", "crash")
TRACKERS = ("off", "mlflow")


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
                           choices=TRAIN_PARAMS)
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
                       "re-estimates them for the final weights on its training patches, the server averages them "
                       "by patches, and the sites' validation counts for that model give its operating point: two "
                       "more messages per site at the end) or averaged (as local training left them, averaged "
                       "with the weights)", choices=("sites", "averaged"))
    fedbn: bool = _f(False, "FedBN: each site keeps its own normalisation layers (weights and running "
                     "statistics) across rounds; the server's model holds their average")
    neg_ratio: float = _f(3.0, "negatives drawn per positive in each training epoch (fresh each epoch)")
    augment: bool = _f(True, "training-only flips, 90-degree rotations and small shifts")
    augment_shift_mm: float = _f(3.0, "largest shift of a training patch along each in-plane axis, in mm (0: "
                                 "none; 3: the candidate detector's error; larger moves nodules off centre, label "
                                 "kept: a nodule's centre stays inside the patch up to half the field of view)")
    augment_offsets: int = _f(0, "cut every positive K more times at a true 3D offset (its three planes re-read "
                              "from the volume; uniform in a ball of --augment-offset-mm) and train on one of its "
                              "K + 1 cuts at random each time; the in-plane shift moves the three planes alike, "
                              "which no real offset does (0: off; the cache grows by K x the positives)")
    augment_offset_mm: float = _f(3.0, "radius of --augment-offsets' offsets, in mm")
    augment_scanner: bool = _f(False, "training-only scanner variation: half the training patches get another "
                               "scanner's look, drawn afresh (a softer kernel: blur up to 1 mm; thicker slices: "
                               "blur along z up to 1.1 mm; noise up to 30 HU; calibration gain 0.97-1.03, offset "
                               "up to 20 HU), for sites that each see one scanner (needs --augment)")
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
    synthetic_scans: int = _f(100, "scans of the default synthetic data set (made on first use), round-robin over "
                              "LUNA16's ten subsets")
    synthetic_test_scans: int = _f(90, "extra test-only scans of the default synthetic data set, all in the first "
                                   "--test-subsets subset (they cost only inference; the sites' data is unchanged)")
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
    strategy: str = _f("fedavgm", "Flower strategy (default fedavgm with server lr 2 and no momentum: the sites' "
                       "mean change, stepped twice; measured against fedavg in the README, issue 16): " + "; ".join(
        f"{name} ({', '.join('--' + s.replace('_', '-') for s in own)})" if own else name
        for name, own in STRATEGY_SETTINGS.items()), choices=STRATEGIES)
    fraction_fit: float = _f(1.0, "share of sites sampled for training each round")
    fraction_evaluate: float = _f(1.0, "share of sites sampled for federated evaluation each round")
    site_eval: str = _f("fused", "when sites evaluate the global model on their validation patches: fused (at "
                        "the start of the next round's training call, at every site sampled to train: no extra "
                        "message or weights download; the last round's model in its own phase) or separate "
                        "(Flower's evaluate phase after every round)", choices=("fused", "separate"))
    min_fit_clients: int = _f(0, "fewest valid updates a round needs (0 = half the sampled sites, at least 1)")
    proximal_mu: float = _f(0.01, "FedProx proximal term weight")
    server_lr: float = _f(0.0, "server learning rate of fedavgm / fedadam / fedyogi (0 = the default: "
                          f"{FEDAVGM_SERVER_LR} for fedavgm, 0.01 for fedadam and fedyogi)")
    server_momentum: float = _f(0.0, "server momentum of fedavgm (Flower's usual is 0.9; 0 measured better on the "
                                "demo with server lr 2)")
    trim_beta: float = _f(0.2, "fraction trimmed at each end by fedtrimmedavg")
    krum_malicious: int = _f(1, "number of malicious sites krum tolerates")
    round_timeout: float = _f(3600.0, "seconds a round waits for replies; late sites are left out")
    node_timeout: float = _f(300.0, "seconds to wait for enough sites to connect before failing")
    update_dtype: str = _f("float32", "dtype of weights on the wire (float16/bfloat16 halve traffic)",
                           choices=UPDATE_DTYPES)
    fail_prob: float = _f(0.0, "simulation only: chance that a site fails a round at random", rehearsal=True)
    inject: str = _f("", "simulation only, to rehearse attacks and faults: SITE:KIND pairs, e.g. "
                     "'site-2:nan,site-5:signflip' (kinds: nan, shape, missing, inflate, signflip, slow, crash)",
                     rehearsal=True)
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
    ray_address: str = _f("", "attach to an existing Ray cluster (e.g. auto or 10.0.0.5:6379); its workers run "
                              "at the niceness it was started with (Ray's default 15; `RAY_worker_niceness=0 "
                              "ray start ...` for 0, as a local instance of sim/run.py)")
    # --- bookkeeping --------------------------------------------------------------------------
    seed: int = _f(0, "seed for data, partitions, sampling and training")
    out: str = _f("runs", "folder that receives one results folder per run")
    run_name: str = _f("", "name of the results folder (empty = made from mode, strategy and time)")
    keep_checkpoints: int = _f(2, "global-model checkpoints kept (the newest N)")
    op_rule: str = _f("recall90", "how the operating point is chosen from the sites' summed validation counts "
                      "(centralized: its pooled validation split): recall90 (the highest threshold that keeps "
                      "validation recall at 0.90: a screening point), youden (max recall + specificity - 1) or f1",
                      choices=OPERATING_RULES)
    eval_every: int = _f(1, "evaluate on the test split every N rounds (and always after the last)")
    # --- experiment tracking (never needed to train; a results folder is always written) ---
    tracking: str = _f("off", "also log the run to an experiment tracker: off or mlflow (parameters, per-round "
                       "global and per-site metrics, plots, the final model)", choices=TRACKERS)
    tracking_uri: str = _f("", "MLflow tracking URI (a team's server, e.g. http://mlflow.internal:5000; empty = "
                           "a local SQLite store, <out>/mlflow.db, artifacts in <out>/mlartifacts)")
    tracking_experiment: str = _f("luna-fl", "MLflow experiment the run is logged under")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                problems.append(f"--{_kebab(f.name)} {value!r}: choose one of {', '.join(choices)}")
        if self.synthetic_test_scans < 0:
            problems.append(f"--synthetic-test-scans must be at least 0, got {self.synthetic_test_scans}")
        positive = ("clients", "synthetic_scans", "rounds", "local_epochs", "batch_size", "image_size", "workers",
                    "eval_every", "keep_checkpoints")
        problems += [f"--{_kebab(n)} must be at least 1, got {getattr(self, n)}"
                     for n in positive if getattr(self, n) < 1]
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.server_lr < 0:
            problems.append(f"--server-lr must be >= 0 (0 = the strategy's default), got {self.server_lr}")
        if not 0.0 <= self.server_momentum < 1.0:
            problems.append(f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        if not 0 <= self.augment_offsets <= 64:
            problems.append(f"--augment-offsets must be in [0, 64], got {self.augment_offsets}")
        if self.augment_scanner and not self.augment:
            problems.append("--augment-scanner needs --augment (it varies training patches only); drop "
                            "--no-augment or --augment-scanner")
        if self.augment_offsets and not 0 < self.augment_offset_mm < self.fov_mm / 2:
            problems.append(f"--augment-offset-mm must be in (0, fov-mm / 2 = {self.fov_mm / 2:g}), got "
                            f"{self.augment_offset_mm}")
        if not 0 <= self.augment_shift_mm < self.fov_mm / 2:
            problems.append(f"--augment-shift-mm must be in [0, fov-mm / 2 = {self.fov_mm / 2:g}) so that a "
                            f"shifted nodule's centre stays in the patch, got {self.augment_shift_mm}")
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
        at_least_zero = ("server_lr", "dp_epsilon", "dp_noise", "weight_decay", "proximal_mu", "gpus_per_client",
                         "max_parallel", "min_fit_clients", "krum_malicious", "max_neg_per_scan")
        problems += [f"--{_kebab(n)} must be >= 0, got {getattr(self, n)}"
                     for n in at_least_zero if not getattr(self, n) >= 0]
        above_zero = ("dp_clip", "round_timeout", "node_timeout", "cpus_per_client")
        problems += [f"--{_kebab(n)} must be > 0, got {getattr(self, n)}"
                     for n in above_zero if not getattr(self, n) > 0]
        if not 0.0 <= self.dp_delta < 1.0:
            problems.append(f"--dp-delta must be in [0, 1) (0 = the default rule), got {self.dp_delta}")
        if not 0.0 <= self.trim_beta < 0.5:
            problems.append(f"--trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.synthetic_scans < 10:
            problems.append(f"--synthetic-scans must be at least 10 (one per LUNA16 subset), got "
                            f"{self.synthetic_scans}")
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
        if self.dp == "central" and self.strategy not in CENTRAL_DP_STRATEGIES:
            problems.append(f"--dp central accounts FedAvg's mean (Flower's accountant): choose --strategy "
                            f"{' or '.join(CENTRAL_DP_STRATEGIES)}, not {self.strategy}"
                            + (" (the default)" if self.strategy == type(self).strategy else ""))
        if self.tracking_uri and self.tracking == "off":
            problems.append(f"--tracking-uri {self.tracking_uri!r} is set but --tracking is off; add --tracking mlflow")
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

    def rehearsal(self) -> dict[str, Any]:
        """The simulation-only fault-rehearsal settings this run sets ({kebab name: value}).

        Only ``sim/faults.py`` acts on them; a hospital's ClientApp refuses a run that sets any.
        """
        return {_kebab(n): getattr(self, n) for n in REHEARSAL if getattr(self, n) != _DEFAULTS[n]}

    def without_rehearsal(self) -> RunConfig:
        """This configuration with every rehearsal setting at its default."""
        return dataclasses.replace(self, **{n: _DEFAULTS[n] for n in REHEARSAL})

    def for_site(self) -> str:
        """What the server sends a site: the settings of :data:`SITE_GROUPS`, as JSON."""
        d = self.to_dict()
        return json.dumps({k: d[k] for k in SITE_SETTINGS}, sort_keys=True)

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
        """``--server-lr``, or the chosen strategy's default when it is 0."""
        if self.server_lr > 0:
            return self.server_lr
        return FEDAVGM_SERVER_LR if self.strategy == "fedavgm" else 0.01

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


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(RunConfig)}

# Every setting by concern. A site receives only the groups in SITE_GROUPS: what it needs to
# build the server's model and to train and evaluate it as the server logged; how the
# coordinator samples, aggregates, simulates and keeps records stays with the coordinator
# (a test checks that every setting has one group and that the hospital's code reads no other).
GROUPS: dict[str, tuple[str, ...]] = {
    "training": ("rounds", "local_epochs", "batch_size", "optimizer", "lr", "momentum", "train_params",
                 "weight_decay", "lr_schedule", "warmup_passes", "site_optimizer", "fedbn", "neg_ratio", "augment",
                 "augment_shift_mm", "augment_offsets", "augment_offset_mm",
                 "augment_scanner", "arch", "norm", "device", "amp", "seed"),
    "data": ("image_size", "fov_mm", "hu_min", "hu_max", "max_neg_per_scan", "workers", "on_bad_scan",
             "val_fraction"),
    "federation": ("strategy", "proximal_mu", "update_dtype"),  # what a site's training depends on
    "privacy": ("dp", "dp_epsilon", "dp_delta", "dp_noise", "dp_clip", "dp_grad_sample_mode"),
    "coordinator": ("mode", "federation", "weights", "fraction_fit", "fraction_evaluate", "site_eval",
                    "min_fit_clients", "server_lr", "server_momentum", "trim_beta", "krum_malicious", "round_timeout",
                    "node_timeout", "out", "run_name", "keep_checkpoints", "eval_every", "tracking", "tracking_uri",
                    "tracking_experiment", "op_rule", "bn_stats"),
    "simulation": ("clients", "data", "cache_dir", "synthetic_scans", "synthetic_test_scans", "partition", "alpha",
                   "test_subsets", "cpus_per_client", "gpus_per_client", "max_parallel", "ray_address",
                   "fail_prob", "inject"),
}
SITE_GROUPS = ("training", "data", "federation", "privacy")
SITE_SETTINGS = tuple(n for g in SITE_GROUPS for n in GROUPS[g])
REHEARSAL = tuple(f.name for f in fields(RunConfig) if f.metadata.get("rehearsal"))


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    kind: type[Any] = type(f.default)
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
