"""fedtune's :class:`~fedtune.transport.Transport` over a Flower ``Grid`` (the SuperLink).

The server's round loop does not know it is deployed: it calls :meth:`FlowerTransport.send` with
one fedtune message per client, exactly as with the in-process transport, and gets
:class:`~fedtune.transport.Reply` objects back in the order it asked, parsed by the same
:func:`~fedtune.transport.parse_reply`.

What this transport adds is what a network needs:

* **who is where**: every SuperNode answers a ``query`` message with the fedtune client ids it holds
  (its ``--node-config client-id=...``) and their training-set sizes. Nodes are queried when they
  first appear, so a restarted SuperNode (Flower gives it a new node id) is found again before the
  next exchange and takes part from then on;
* **timeouts**: replies are pulled every ``deploy.poll_s`` seconds until all are in or
  ``deploy.round_timeout_s`` has passed; a client that did not answer, answered with a Flower error
  (its ClientApp failed, or the SuperLink declared its node gone) or is not connected becomes a
  rejected reply with the reason, and the round goes on without it;
* **a minimum**: a fit exchange needs ``deploy.min_clients`` replies (default: all sampled). With
  fewer clients connected it first waits up to ``deploy.join_timeout_s`` for them; with fewer
  replies than that in the end it raises :class:`RoundFailed` and the run stops (nothing is
  aggregated; the last checkpoint stays, and ``fedtune deploy submit --resume`` continues it).
* **fixed order**: replies are handed to ``on_reply`` (where FedAvg folds them) in the order of
  ``instructions``, whatever order they arrive in, so aggregation is deterministic and equals the
  simulation's.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable

from fedtune.config import DeployConfig
from fedtune.errors import FedtuneError
from fedtune.flower import RECORD
from fedtune.messages import Message, encode
from fedtune.transport import Reply, Spec, parse_reply

log = logging.getLogger(__name__)

_TYPES = {"fit": "train", "evaluate": "evaluate", "query": "query"}


#: seconds before a SuperNode whose ``query`` came back with an error is asked again
QUERY_RETRY_S = 2.0


class RoundFailed(FedtuneError):
    """Fewer clients answered a fit exchange than ``deploy.min_clients``."""


def natural_key(s: str) -> list:
    """``client_2`` before ``client_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


class FlowerTransport:
    def __init__(self, grid, deploy: DeployConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.grid = grid
        self.d = deploy
        self.sleep = sleep
        self.clock = clock
        self.node_of: dict[str, int] = {}  # fedtune client id -> Flower node id
        self.answered: dict[int, list[str]] = {}  # node id -> the client ids it announced
        self.num_train: dict[str, int] = {}
        self.retry_at: dict[int, float] = {}  # node id -> when to ask again after a failed query

    # ---- who is where ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget nodes that left; query nodes seen for the first time."""
        online = set(self.grid.get_node_ids())
        for n in [n for n in self.answered if n not in online]:
            for cid in self.answered.pop(n):
                if self.node_of.get(cid) == n:
                    del self.node_of[cid]
        now = self.clock()
        new = sorted(n for n in online if n not in self.answered and now >= self.retry_at.get(n, now))
        if not new:
            return
        got = self._exchange("query", {n: (n, b"", {}) for n in new}, timeout=self.d.join_timeout_s)
        for n in new:
            reply = got.get(n)
            if reply is None or reply.has_error():
                # A node that never answered is asked again only after join_timeout_s, so one broken
                # SuperNode cannot hold up every exchange. An error reply comes at once (typically
                # "node unavailable" from a SuperLink that restarted before the node reconnected):
                # ask again soon, or a node that is back a second later would be left out.
                why = reply.error.reason if reply is not None else "no answer"
                wait = self.d.join_timeout_s if reply is None else min(self.d.join_timeout_s, QUERY_RETRY_S)
                log.warning("SuperNode %s did not say which clients it holds (%s); asking again in %gs",
                            n, why, wait)
                self.retry_at[n] = self.clock() + wait
                continue
            try:
                clients = json.loads(reply.content[RECORD]["clients"])
                if not isinstance(clients, dict) or not all(
                        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in clients.items()):
                    raise ValueError("not a mapping of client id to example count")
            except (KeyError, ValueError, TypeError) as e:
                log.warning("SuperNode %s sent an unusable client list: %s", n, e)
                self.answered[n] = []
                continue
            self.answered[n] = list(clients)
            for cid, num in clients.items():
                old = self.node_of.get(cid)
                if old is not None and old != n:
                    log.warning("client %s moved from node %s to node %s (a restarted SuperNode)", cid, old, n)
                self.node_of[cid] = n  # the newest node wins: an old one holding it is gone
                self.num_train[cid] = num
            log.info("SuperNode %s holds %s", n, clients)

    def wait_for(self, cids: list[str], need: int, timeout: float) -> list[str]:
        """Refresh until ``need`` of ``cids`` are connected (or ``timeout``); return those connected."""
        end = self.clock() + timeout
        while True:
            self.refresh()
            have = [c for c in cids if c in self.node_of]
            if len(have) >= need or self.clock() >= end:
                return have
            self.sleep(min(1.0, max(self.d.poll_s, 0.05)))

    def discover(self, clients: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
        """The run's clients (in aggregation order) and their training-set sizes, once enough
        SuperNodes have connected; :class:`FedtuneError` if they do not within the join timeout.

        ``clients`` (a resumed run's, from its checkpoint) or ``deploy.clients`` fix the set;
        without either it is whoever has connected once every online SuperNode has answered."""
        want = list(clients or self.d.clients)
        if want:
            need = len(want) if self.d.min_clients is None else min(self.d.min_clients, len(want))
            have = self.wait_for(want, len(want), self.d.join_timeout_s)
            if len(have) < need:
                raise FedtuneError(
                    f"only {len(have)} of the {len(want)} clients in deploy.clients connected within "
                    f"{self.d.join_timeout_s:g}s (need {need}): missing {sorted(set(want) - set(have))}; "
                    "start their SuperNodes (fedtune deploy supernode ...) or lower deploy.min_clients")
            return want, {c: self.num_train.get(c, 0) for c in want}
        need = self.d.min_clients or 1
        end = self.clock() + self.d.join_timeout_s
        while True:
            self.refresh()
            online = set(self.grid.get_node_ids())
            settled = online <= set(self.answered)
            if (len(self.node_of) >= need and settled) or self.clock() >= end:
                break
            self.sleep(1.0)
        if len(self.node_of) < need:
            raise FedtuneError(f"only {len(self.node_of)} clients connected within {self.d.join_timeout_s:g}s, "
                               f"need deploy.min_clients={need}")
        cids = sorted(self.node_of, key=natural_key)
        return cids, {c: self.num_train[c] for c in cids}

    # ---- one exchange ------------------------------------------------------------------------
    def _exchange(self, kind: str, out: dict, *, timeout: float, on_arrival=None) -> dict:
        """Push ``out[key] = (node, payload, fields)``; pull replies until all are in or ``timeout``.
        Returns ``key -> Flower reply`` for those that arrived."""
        from flwr.app import ConfigRecord, Message as FlowerMessage, RecordDict

        keys = list(out)
        msgs = []
        for key in keys:
            node, payload, fields = out[key]
            rec = ConfigRecord({**fields, "payload": payload})
            msgs.append(FlowerMessage(RecordDict({RECORD: rec}), int(node), _TYPES[kind],
                                      ttl=timeout + 60.0, group_id=str(fields.get("round", ""))))
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(keys):  # Flower returns [] when the request is too large
            log.warning("the SuperLink accepted %d of %d %s messages", len(ids), len(keys), kind)
            ids += [""] * (len(keys) - len(ids))
        waiting = {mid: key for mid, key in zip(ids, keys) if mid}
        for mid, key in zip(ids, keys):
            if not mid:
                log.warning("the SuperLink refused the %s message for %s", kind, key)
        got: dict = {}
        end = self.clock() + timeout
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                key = waiting.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                got[key] = reply
                if on_arrival is not None:
                    on_arrival(key, reply)
            if not waiting or self.clock() >= end:
                break
            self.sleep(self.d.poll_s)
        return got

    def send(self, kind: str, instructions: dict[str, Message], *, expect: dict[str, Spec] | None = None,
             on_reply: Callable[[Reply], None] | None = None) -> list[Reply]:
        cids = list(instructions)
        need = len(cids) if self.d.min_clients is None else min(self.d.min_clients, len(cids))
        self.refresh()
        reachable = [c for c in cids if c in self.node_of]
        if kind == "fit" and len(reachable) < need:
            log.warning("%d of %d sampled clients connected, %d needed: waiting up to %gs for %s",
                        len(reachable), len(cids), need, self.d.join_timeout_s,
                        sorted(set(cids) - set(reachable)))
            reachable = self.wait_for(cids, need, self.d.join_timeout_s)
            if len(reachable) < need:
                raise RoundFailed(f"only {len(reachable)} of the {len(cids)} sampled clients are connected "
                                  f"(deploy.min_clients={need}); missing {sorted(set(cids) - set(reachable))}")
        cache: dict[int, bytes] = {}  # a broadcast is encoded once
        down: dict[str, bytes] = {}
        for cid in cids:
            msg = instructions[cid]
            if id(msg) not in cache:
                cache = {id(msg): encode(msg)}
            down[cid] = cache[id(msg)]
        replies: dict[str, Reply] = {}
        order = iter(cids)
        pending = [next(order, None)]
        t0 = time.monotonic()

        def emit_ready() -> None:  # hand replies over in instruction order
            while pending[0] is not None and pending[0] in replies:
                if on_reply is not None:
                    on_reply(replies[pending[0]])
                pending[0] = next(order, None)

        def arrived(cid: str, fr) -> None:
            secs = time.monotonic() - t0
            spec = (expect or {}).get(cid)
            if fr.has_error():
                replies[cid] = parse_reply(cid, kind, None, bytes_down=len(down[cid]), seconds=secs,
                                           error=f"Flower error {fr.error.code}: {fr.error.reason}")
            else:
                try:
                    rec = fr.content[RECORD]
                    up, who = bytes(rec["payload"]), str(rec["cid"])
                except (KeyError, TypeError) as e:
                    up, who = None, cid
                    err = f"reply without a fedtune record ({e})"
                else:
                    err = None if who == cid else f"reply names client '{who}', expected '{cid}'"
                replies[cid] = parse_reply(cid, kind, up if err is None else None, bytes_down=len(down[cid]),
                                           seconds=secs, expect=spec, error=err)
            emit_ready()

        for cid in cids:  # clients not connected: rejected now, before the exchange
            if cid not in reachable:
                replies[cid] = parse_reply(cid, kind, None, bytes_down=0, seconds=0.0,
                                           error="not connected (no SuperNode holds this client)")
        emit_ready()
        rnd = int(next((m.config.get("round", 0) for m in instructions.values()), 0))
        out = {cid: (self.node_of[cid], down[cid], {"cid": cid, "round": rnd}) for cid in reachable}
        self._exchange(kind, out, timeout=self.d.round_timeout_s, on_arrival=arrived)
        for cid in cids:
            if cid not in replies:
                replies[cid] = parse_reply(cid, kind, None, bytes_down=len(down[cid]),
                                           seconds=time.monotonic() - t0,
                                           error=f"no reply within deploy.round_timeout_s={self.d.round_timeout_s:g}s")
        emit_ready()
        result = [replies[c] for c in cids]
        ok = sum(r.message is not None for r in result)
        if kind == "fit" and ok < need:
            raise RoundFailed(f"round {rnd}: {ok} of {len(cids)} clients answered, deploy.min_clients={need}; "
                              + "; ".join(f"{r.cid}: {r.error}" for r in result if r.error))
        return result
