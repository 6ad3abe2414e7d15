"""The guard that makes any Flower strategy safe to run at hospitals.

Flower's strategies own the round loop and the aggregation rule; we never copy them.
:class:`Guard` wraps the chosen strategy (as Flower's own DP wrappers do) and adds what
a federation of hospitals needs and the 1.41 strategies lack:

- updates with NaN/Inf, missing or extra keys, wrong shapes, or an example count larger
  than the site's partition are rejected before aggregation, and the site is named;
- a site whose reply is an error is named in the round's log; the round aggregates the
  rest unless fewer than ``min_fit`` valid updates remain, which fails the round clearly;
- sampling never waits forever: too few connected nodes is a timeout error;
- replies are sorted by site before aggregation and sampling sees nodes in site order,
  so a seed gives the same global model whatever order replies arrive in;
- weights travel as float32, float16 or bfloat16 and are aggregated in float32;
- rounds can be offset, so a resumed run continues at round k+1 with Flower's loop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Strategy,
)

from common.config import RunConfig
from common.evaluation.metrics import COUNT_KEYS
from common.training import wire

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """A round could not produce a trustworthy global model."""


class NodesUnavailable(TimeoutError):
    """Not enough sites connected within the configured time."""


def quorum(cfg: RunConfig, n_sampled: int) -> int:
    """Fewest valid updates a round needs: --min-fit-clients, else half the sampled sites."""
    return cfg.min_fit_clients or max(1, math.ceil(n_sampled / 2))


@dataclass
class RoundLog:
    """What the guard saw in one round (read by the server's recorder)."""

    started: float = 0.0
    trained: float = 0.0  # when aggregate_train finished
    evaluated: float = 0.0  # when aggregate_evaluate finished
    sampled: list[str] = field(default_factory=list)
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    # per site: its validation threshold counts (common.evaluation.metrics.threshold_counts), the only
    # thing about its predictions that leaves it; the server's operating point is their sum
    val_counts: dict[str, dict[str, int | list[int]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0


class Guard(Strategy):
    """Wraps a Flower strategy with validation, naming, quorum, timeouts and round offset."""

    def __init__(self, inner: Strategy, cfg: RunConfig, reference: dict[str, np.ndarray],
                 node_sites: dict[int, str], limits: dict[str, int], *, round_offset: int = 0,
                 on_event: Callable[[str, int, str, dict], None] | None = None,
                 excluded: set[int] | None = None) -> None:
        self.inner = inner
        self.cfg = cfg
        self.shapes = {k: tuple(np.shape(v)) for k, v in reference.items()}
        self.reference = reference
        self.node_sites = dict(node_sites)
        self.limits = dict(limits)
        self.round_offset = round_offset
        self.on_event = on_event or (lambda kind, rnd, site, data: None)
        self.rounds: dict[int, RoundLog] = {}
        self.excluded = set(excluded or ())  # nodes that could not take part at the handshake
        self._sent: dict[tuple[int, str], list[Message]] = {}

    # ---- helpers ----
    def site_of(self, node_id: int) -> str:
        return self.node_sites.get(node_id, f"node-{node_id}")

    def sender(self, reply: Message, rnd: int, phase: str) -> str:
        """The site a reply answers for. An error the SuperLink writes itself for a node that
        went away comes from the SuperLink's own id; the instruction it answers names the site."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.get((rnd, phase), [])}
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        return self.site_of(node)

    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def _log(self, rnd: int) -> RoundLog:
        return self.rounds.setdefault(rnd, RoundLog())

    def _ordered_grid(self, grid: Grid, rnd: int, phase: str) -> Grid:
        # Give every site up to --node-timeout to be connected (a restarted hospital rejoins
        # here), then go on with whoever is there, down to the quorum.
        at_least = quorum(self.cfg, len(self.node_sites))
        expected = len(set(self.node_sites) - self.excluded) or at_least
        wait_for_nodes(grid, expected, self.cfg.node_timeout, at_least=at_least, excluded=self.excluded)
        view = _SiteOrderedGrid(grid, self.site_of, self.excluded)
        # The guard samples (the inner strategy takes every node it is shown), with a generator
        # of its own: the same sites for the same seed and round, whatever else uses `random`.
        nodes = view.get_node_ids()
        fraction = self.cfg.fraction_fit if phase == "train" else self.cfg.fraction_evaluate
        k = max(int(len(nodes) * fraction), 1)
        if k < len(nodes):
            view.only = set(random.Random(f"{self.cfg.seed}:{rnd}").sample(nodes, k))
        # a duck-typed view (__getattr__ forwards the rest of the Grid), not a Grid subclass
        return cast(Grid, view)

    @property
    def fused_eval(self) -> bool:
        """--site-eval fused: sites evaluate round r's model when round r+1's training
        message brings it, so only the last round has an evaluate phase of its own."""
        return self.cfg.site_eval == "fused"

    def _site_evaluated(self, rnd: int, site: str, record) -> None:
        """Keep a site's evaluation reply: its metrics, and its threshold counts apart."""
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k not in COUNT_KEYS}
        counts = {k: record[k] for k in COUNT_KEYS if k in record}
        lg = self._log(rnd)
        lg.evaluate[site] = metrics
        if len(counts) == len(COUNT_KEYS):
            lg.val_counts[site] = {k: (list(v) if isinstance(v, list) else int(v)) for k, v in counts.items()}
        self.on_event("evaluate", rnd, site, metrics)

    def _by_site(self, msgs: Iterable[Message]) -> list[Message]:
        """Messages in site-name order (then node id): the same order whatever order Flower
        lists nodes in, so sums over sites and logs are reproducible."""
        return sorted(msgs, key=lambda m: (self.site_of(m.metadata.dst_node_id), m.metadata.dst_node_id))

    def _encode_into(self, msgs: list[Message], arrays: ArrayRecord) -> int:
        """Put the wire encoding of ``arrays`` into the messages (the inner strategy kept
        the float32 original, e.g. FedAdam for its pseudo-gradient); return its bytes."""
        if self.cfg.update_dtype == "float32" or not msgs:
            return sum(len(a.data) for a in arrays.values())
        record = wire.to_record(wire.encode(wire.views(arrays), self.cfg.update_dtype))
        for m in msgs:
            for key in list(m.content.array_records):
                m.content[key] = record
        return sum(len(a.data) for a in record.values())

    # ---- training ----
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        rnd = self._round(server_round)
        lg = self._log(rnd)
        lg.started = time.time()
        grid = self._ordered_grid(grid, rnd, "train")  # may wait up to --node-timeout for a restarting site
        # The sites' deadline starts when the round's messages go out, as Flower's own reply
        # timeout does: the wait for sites above must not eat into their training time.
        config["deadline"] = time.time() + self.cfg.round_timeout
        config["evaluate-first"] = int(self.fused_eval and rnd >= 2)  # round rnd-1's model, at each site
        msgs = self._by_site(self.inner.configure_train(rnd, arrays, config, grid))
        nbytes = self._encode_into(msgs, arrays)
        self._sent[(rnd, "train")] = msgs
        lg.sampled = [self.site_of(m.metadata.dst_node_id) for m in msgs]
        lg.bytes_down += nbytes * len(msgs)
        return msgs

    def validate(self, msg: Message) -> tuple[str, str | None]:
        """(site, reason to reject or None) for one training reply."""
        site = self.site_of(msg.metadata.src_node_id)
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return site, "expected one ArrayRecord and one MetricRecord"
        metrics = next(iter(content.metric_records.values()))
        n = metrics.get("num-examples")
        if not isinstance(n, (int, float)) or not math.isfinite(float(n)) or n <= 0:
            return site, f"num-examples {n!r} is not a positive number"
        limit = self.limits.get(site)
        if limit is not None and n > limit:
            return site, f"num-examples {n:g} exceeds the site's training partition ({limit})"
        arrays = next(iter(content.array_records.values()))
        keys = set(arrays.keys())
        missing, extra = sorted(set(self.shapes) - keys), sorted(keys - set(self.shapes))
        if missing or extra:
            return site, f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        try:
            decoded = wire.decode(wire.views(arrays), self.cfg.update_dtype, self.reference)
        except Exception as exc:  # noqa: BLE001 - an undecodable array is a rejected update
            return site, f"weights cannot be decoded: {exc}"
        for k, v in decoded.items():
            if tuple(v.shape) != self.shapes[k]:
                return site, f"{k} has shape {tuple(v.shape)}, the model has {self.shapes[k]}"
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                return site, f"{k} holds NaN or Inf"
        if self.cfg.update_dtype != "float32":  # hand the strategy float32 (float32 replies are kept as sent)
            content[next(iter(content.array_records))] = wire.to_record(decoded)
        return site, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round(server_round)
        lg = self._log(rnd)
        accepted: list[tuple[str, Message]] = []
        for msg in replies:
            site = self.sender(msg, rnd, "train")
            if msg.has_error():
                # Flower types an Error's reason str | None
                lg.failed[site] = short_reason(cast(str, msg.error.reason))
                log.warning("[round %d] [site %s] failed: %s", rnd, site, short_reason(cast(str, msg.error.reason)))
                self.on_event("failure", rnd, site, {"phase": "train", "reason": msg.error.reason})
                continue
            site, reason = self.validate(msg)
            if reason is not None:
                lg.rejected[site] = reason
                log.warning("[round %d] [site %s] update rejected: %s", rnd, site, reason)
                self.on_event("rejected", rnd, site, {"phase": "train", "reason": reason})
                _drop_weights(msg)
                continue
            metrics = {k: float(v) for k, v in next(iter(msg.content.metric_records.values())).items()
                       if not isinstance(v, list)}
            lg.train[site] = metrics
            lg.bytes_up += int(metrics.get("bytes-sent", 0))
            self.on_event("train", rnd, site, metrics)
            if "val" in msg.content.config_records:  # fused evaluation of the previous round's model
                self._site_evaluated(rnd - 1, site, msg.content["val"])
            accepted.append((site, msg))
        missing = [s for s in lg.sampled if s not in lg.train and s not in lg.failed and s not in lg.rejected]
        for site in missing:
            lg.failed[site] = f"no reply within --round-timeout {self.cfg.round_timeout:g}s"
            log.warning("[round %d] [site %s] did not reply in time; the round closes without it", rnd, site)
            self.on_event("failure", rnd, site, {"phase": "train", "reason": lg.failed[site]})
        need = quorum(self.cfg, len(lg.sampled))
        if len(accepted) < need:
            raise RoundFailed(f"round {rnd}: only {len(accepted)} valid update(s) of {len(lg.sampled)} sampled "
                              f"sites, at least {need} needed (--min-fit-clients); failed: "
                              f"{_names(lg.failed)}; rejected: {_names(lg.rejected)}")
        accepted.sort(key=lambda sm: sm[0])
        arrays, aggregated = self.inner.aggregate_train(rnd, [m for _, m in accepted])
        for _, msg in accepted:  # Flower's loop holds this round's replies through the next round:
            _drop_weights(msg)  # let their ~100 MB each go now
        if arrays is None:
            raise RoundFailed(f"round {rnd}: the {self.cfg.strategy} strategy produced no global model")
        out = {}
        for k, v in arrays.items():
            a = wire.view(v)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise RoundFailed(f"round {rnd}: the aggregated {k} holds NaN or Inf")
            # Back to the model's dtypes: FedAdam/FedYogi return float64 (NumPy promotes
            # their float64 step size), which would double the traffic and make a
            # resumed run (restored from the float32 checkpoint) drift from an
            # uninterrupted one. Integer buffers (BatchNorm counters) are rounded.
            ref = self.reference[k].dtype
            out[k] = np.asarray(np.rint(a) if np.issubdtype(ref, np.integer) else a).astype(ref, copy=False)
        lg.trained = time.time()
        return wire.to_record(out), aggregated

    # ---- evaluation ----
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        rnd = self._round(server_round)
        if self.fused_eval and rnd < self.cfg.rounds:
            return []  # round rnd+1's training messages carry this model to the sites' evaluation
        msgs = self._by_site(self.inner.configure_evaluate(rnd, arrays, config,
                                                           self._ordered_grid(grid, rnd, "evaluate")))
        nbytes = self._encode_into(msgs, arrays)
        self._sent[(rnd, "evaluate")] = msgs
        self._log(rnd).bytes_down += nbytes * len(msgs)
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self._round(server_round)
        lg = self._log(rnd)
        ok: list[tuple[str, Message]] = []
        for msg in replies:
            site = self.sender(msg, rnd, "evaluate")
            if msg.has_error():
                log.warning("[round %d] [site %s] evaluation failed: %s", rnd, site,
                            short_reason(cast(str, msg.error.reason)))
                self.on_event("failure", rnd, site, {"phase": "evaluate", "reason": msg.error.reason})
                continue
            self._site_evaluated(rnd, site, next(iter(msg.content.metric_records.values())))
            ok.append((site, msg))
        ok.sort(key=lambda sm: sm[0])
        out = self.inner.aggregate_evaluate(rnd, [m for _, m in ok]) if ok else None
        lg.evaluated = time.time()
        self._sent = {k: v for k, v in self._sent.items() if k[0] > rnd}  # keep memory flat
        return out

    def summary(self) -> None:
        self.inner.summary()


def _drop_weights(msg: Message) -> None:
    """Remove the weights from an aggregated reply, keeping its metrics and configs."""
    msg.content = RecordDict({k: v for k, v in msg.content.items() if not isinstance(v, ArrayRecord)})


class _SiteOrderedGrid:
    """A view of the Grid whose node list is in site-name order (for reproducible sampling)."""

    def __init__(self, grid: Grid, site_of: Callable[[int], str], excluded: set[int] | None = None) -> None:
        self._grid = grid
        self._site_of = site_of
        self._excluded = excluded or set()
        self.only: set[int] | None = None  # the guard's sample, when it took one

    def get_node_ids(self) -> list[int]:
        nodes = [n for n in self._grid.get_node_ids() if n not in self._excluded
                 and (self.only is None or n in self.only)]
        return sorted(nodes, key=lambda n: (self._site_of(n), n))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def wait_for_nodes(grid: Grid, needed: int, timeout: float, at_least: int | None = None,
                   excluded: set[int] | None = None) -> list[int]:
    """Node ids once ``needed`` are connected.

    After ``timeout`` seconds: with ``at_least`` set and that many connected, go on with
    them (a warning says how many are missing); otherwise NodesUnavailable.
    """
    deadline = time.time() + timeout
    last = -1
    excluded = excluded or set()
    while True:
        nodes = [n for n in grid.get_node_ids() if n not in excluded]
        if len(nodes) >= needed:
            return nodes
        if time.time() > deadline:
            if at_least is not None and len(nodes) >= at_least:
                log.warning("only %d of %d sites are connected after --node-timeout %gs; the round goes on "
                            "with them", len(nodes), needed, timeout)
                return nodes
            raise NodesUnavailable(f"only {len(nodes)} of the {needed} sites connected within --node-timeout "
                                   f"{timeout:g}s; check that every SuperNode is running and can reach the "
                                   "SuperLink, or lower --clients")
        if len(nodes) != last:
            log.info("waiting for sites: %d of %d connected", len(nodes), needed)
            last = len(nodes)
        time.sleep(0.5)


def short_reason(reason: str | None, n: int = 300) -> str:
    """The message of a site's error, without the Ray and Flower wrapping around it."""
    if not reason:  # Flower allows an error without a reason
        return "the site gave no reason"
    if "Message:" in reason:
        reason = reason.rsplit("Message:", 1)[1].strip().rstrip("'>").strip()
    else:
        lines = [ln for ln in reason.splitlines() if ln.strip()]
        reason = lines[-1] if lines else reason
    reason = " ".join(reason.split())
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def _names(d: dict[str, str]) -> str:
    return ", ".join(f"{k} ({short_reason(v, 80)})" for k, v in sorted(d.items())) or "none"
