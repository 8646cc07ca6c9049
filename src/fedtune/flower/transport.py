"""fedtune's :class:`~fedtune.transport.Transport` over a Flower ``Grid`` (the SuperLink).

The server's round loop does not know it is deployed: it calls :meth:`FlowerTransport.send` with
one fedtune message per client, exactly as with the in-process transport, and gets
:class:`~fedtune.transport.Reply` objects back in the order it asked, parsed by the same
:func:`~fedtune.transport.parse_reply`.

What this transport adds is what a network needs:

* **who is where**: every SuperNode answers a ``query`` message with the fedtune client ids it holds
  (its ``--node-config client-id=...``) and their training-set sizes. Nodes are queried when they
  first appear, so a restarted SuperNode (Flower gives it a new node id) is found again before the
  next exchange and takes part from then on. A node has ``deploy.query_timeout_s`` to answer; a
  silent one is left out and asked again after a doubling back-off. A client id belongs to the
  first live node that announced it: a second node announcing it is refused while the holder is
  in the SuperLink's live list and still answers (a restarted node's old id is probed, found
  silent, and released). A node registered under client ids (its Flower node name, set by the
  admin with its key) may hold only those;
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
from fedtune.flower.wire import MAX_CID, MAX_MESSAGE_BYTES
from fedtune.messages import Message, encode
from fedtune.transport import Reply, Spec, parse_reply

log = logging.getLogger(__name__)

_TYPES = {"fit": "train", "evaluate": "evaluate", "query": "query"}
#: an algorithm's own message kinds (key agreement, unmasking, ...) travel as Flower ``train``
#: messages whose record names the kind; the ClientApp hands them to the same handler
#: Flower error codes of a reply that the SuperLink wrote for a node that did not answer
#: (message / reply / node unavailable), as opposed to errors the node's ClientApp raised
_NODE_GONE = {3, 4, 5}


#: seconds before a SuperNode whose ``query`` came back with an error is asked again (doubling)
QUERY_RETRY_S = 2.0
#: the longest back-off before asking a silent, failing or refusing SuperNode again
QUERY_BACKOFF_MAX_S = 600.0
#: what a SuperNode's client list may hold: its JSON length, the number of clients, the length of
#: a client id, and a training-set size (a FedAvg weight: exact as a float up to 2**53; 10**400
#: would overflow the weighting)
MAX_CLIENTS_JSON = 1 << 20
MAX_NODE_CLIENTS = 1024
MAX_NUM_TRAIN = 2**53
#: characters of a node-supplied reason (a refusal, a Flower error) kept for logs and metrics
MAX_REASON = 1000


class RoundFailed(FedtuneError):
    """Fewer clients answered a fit exchange than ``deploy.min_clients``."""


def natural_key(s: str) -> list:
    """``client_2`` before ``client_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def clean(text: object) -> str:
    """A node-supplied string fit for a log line: bounded, printable."""
    t = text if isinstance(text, str) else repr(text)
    return "".join(c if c.isprintable() else "?" for c in t[:MAX_REASON])


def parse_client_list(raw: object) -> dict[str, int]:
    """A SuperNode's ``clients`` field: JSON ``{client id: training-set size}``, strictly bounded."""
    if not isinstance(raw, str) or len(raw) > MAX_CLIENTS_JSON:
        raise ValueError(f"not a JSON text of at most {MAX_CLIENTS_JSON} characters")
    clients = json.loads(raw)  # RecursionError on deep nesting: the caller catches it
    if not isinstance(clients, dict) or len(clients) > MAX_NODE_CLIENTS:
        raise ValueError(f"not a mapping of at most {MAX_NODE_CLIENTS} client ids to example counts")
    for cid, num in clients.items():
        if not (0 < len(cid) <= MAX_CID and cid.isprintable()):
            raise ValueError(f"client id {clean(cid[:MAX_CID])!r} is empty, too long or unprintable")
        if not (isinstance(num, int) and not isinstance(num, bool) and 0 <= num <= MAX_NUM_TRAIN):
            raise ValueError(f"client {cid!r}: {clean(num)[:40]} is not a training-set size (0..2**53)")
    return clients


def registered_ids(name: str) -> set[str] | None:
    """Client ids a node's registered Flower name binds it to (``fedtune deploy register
    --client-id a,b`` names it ``a,b``); ``None`` for an unnamed node."""
    ids = {c.strip() for c in name.split(",") if c.strip()}
    return ids or None


def reply_payload(fr, cid: str) -> tuple[bytes | None, str | None]:
    """The fedtune message bytes in a SuperNode's fit/evaluate reply, or ``(None, reason)``. The
    record's fields must already be what fedtune sends: ``payload`` bytes (never converted: bytes()
    of an int allocates that many zeros) of at most ``MAX_MESSAGE_BYTES``, and ``cid`` the client
    the instruction was for."""
    try:
        rec = fr.content[RECORD]
        payload, who = rec["payload"], rec["cid"]
    except (KeyError, TypeError, ValueError) as e:
        return None, f"reply without a fedtune record ({clean(str(e))})"
    if not isinstance(who, str) or who != cid:
        return None, f"reply names client {clean(who)[:MAX_CID]!r}, expected {cid!r}"
    if not isinstance(payload, bytes) or len(payload) > MAX_MESSAGE_BYTES:
        size = len(payload) if isinstance(payload, bytes) else type(payload).__name__
        return None, f"reply payload is not a message of at most {MAX_MESSAGE_BYTES} bytes ({size})"
    return payload, None


class FlowerTransport:
    def __init__(self, grid, deploy: DeployConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.grid = grid
        self.d = deploy
        self.sleep = sleep
        self.clock = clock
        self.node_of: dict[str, int] = {}  # fedtune client id -> Flower node id
        #: node id -> the clients it announced (and may hold), in the order nodes answered
        self.answered: dict[int, dict[str, int]] = {}
        self.num_train: dict[str, int] = {}
        self.retry_at: dict[int, float] = {}  # node id -> when to ask again after a failed query
        self.failures: dict[int, int] = {}  # node id -> failed queries in a row (the back-off)
        self.given_up: set[int] = set()  # silent or refusing nodes: a run need not wait for them
        self.refused: set[tuple[int, str]] = set()  # (node, client id) claims a live holder keeps
        self.missed: set[int] = set()  # nodes that did not answer their last fit/evaluate in time

    # ---- who is where ----------------------------------------------------------------------
    def _online(self) -> dict[int, str]:
        """Live node ids and their registered names ('' when unnamed)."""
        return {int(i.node_id): str(getattr(i, "name", "") or "") for i in self.grid.get_nodes()}

    def _drop(self, n: int) -> None:
        for cid in self.answered.pop(n, {}):
            if self.node_of.get(cid) == n:
                del self.node_of[cid]
        self.refused = {(m, c) for m, c in self.refused if m != n}
        self.missed.discard(n)

    def _failed(self, n: int, why: str, base: float, *, give_up: bool) -> None:
        """Ask ``n`` again after ``base`` seconds, doubled for each failure in a row."""
        k = self.failures[n] = self.failures.get(n, 0) + 1
        wait = min(base * 2 ** (k - 1), QUERY_BACKOFF_MAX_S)
        self.retry_at[n] = self.clock() + wait
        if give_up:
            self.given_up.add(n)
        log.warning("SuperNode %s did not say which clients it holds (%s); asking again in %gs", n, why, wait)

    def _query(self, nodes: list[int]) -> dict:
        return self._exchange("query", {n: (n, b"", {}) for n in nodes}, timeout=self.d.query_timeout_s)

    def _take_answer(self, n: int, reply, name: str) -> None:
        if reply is None:
            # silent: left out for now (a run need not wait for it), asked again after a back-off
            self._failed(n, f"no answer within deploy.query_timeout_s={self.d.query_timeout_s:g}s",
                         self.d.query_timeout_s, give_up=True)
            return
        if reply.has_error():
            # An error comes at once (typically "node unavailable" from a SuperLink that restarted
            # before the node reconnected): ask again soon, or a node that is back a second later
            # would be left out.
            self._failed(n, clean(reply.error.reason), QUERY_RETRY_S, give_up=False)
            return
        try:
            rec = reply.content[RECORD]
            if "refused" in rec:  # the node's own policy refuses this run's config
                log.warning("SuperNode %s refuses this run: %s", n, clean(rec["refused"]))
                self._failed(n, "it refused the run", QUERY_BACKOFF_MAX_S, give_up=True)
                return
            clients = parse_client_list(rec["clients"])
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            log.warning("SuperNode %s sent an unusable client list: %s", n, clean(str(e) or type(e).__name__))
            self.answered[n] = {}
            return
        bound = registered_ids(name)
        if bound is None and self.d.require_bound_clients:
            log.warning("SuperNode %s is not registered under client ids and deploy.require_bound_clients is "
                        "set: it holds no clients (register its key with fedtune deploy register --client-id)", n)
            clients = {}
        elif bound is not None and not set(clients) <= bound:
            log.warning("SuperNode %s is registered for %s but announces %s: ignoring the others",
                        n, sorted(bound), sorted(set(clients) - bound))
            clients = {c: v for c, v in clients.items() if c in bound}
        self.answered[n] = clients
        self.failures.pop(n, None)
        self.given_up.discard(n)
        log.info("SuperNode %s holds %s", n, clients)

    def refresh(self) -> None:
        """Forget nodes that left; query nodes seen for the first time (or due again); give each
        client id to the first live node that announced it."""
        online = self._online()
        for n in [n for n in self.answered if n not in online]:
            self._drop(n)
        for n in [n for n in self.failures if n not in online]:
            self.failures.pop(n)
            self.retry_at.pop(n, None)
            self.given_up.discard(n)
        now = self.clock()
        new = sorted(n for n in online if n not in self.answered and now >= self.retry_at.get(n, now))
        if new:
            got = self._query(new)
            for n in [*got, *(n for n in new if n not in got)]:  # in the order they answered
                self._take_answer(n, got.get(n), online[n])
        self._assign()

    def _assign(self) -> None:
        """Free client ids go to the first node (in answer order) that announced them. A later
        node announcing a held id is refused while the holder still answers for it; a holder that
        does not is taken for gone (a SuperNode restarted under a new node id leaves its old id in
        the live list until its heartbeat lapses) and the newcomer takes over. A holder that let its
        last fit/evaluate time out is taken for gone at once; any other is probed with a query."""
        contested: dict[int, list[tuple[int, str]]] = {}
        for n, clients in self.answered.items():
            for cid, num in clients.items():
                holder = self.node_of.get(cid)
                if holder is None:
                    if cid in self.num_train:
                        log.info("client %s is now on SuperNode %s", cid, n)
                    self.node_of[cid], self.num_train[cid] = n, num
                    self.refused.discard((n, cid))
                elif holder != n and (n, cid) not in self.refused:
                    contested.setdefault(holder, []).append((n, cid))
        if not contested:
            return
        probe = sorted(h for h in contested if h not in self.missed)
        got = self._query(probe) if probe else {}  # one probe for all contested holders
        for h, claims in contested.items():
            r = got.get(h)
            try:
                still = parse_client_list(r.content[RECORD]["clients"]) if r is not None and not r.has_error() else None
            except (KeyError, TypeError, ValueError, RecursionError):
                still = None
            if still is None:
                log.warning("SuperNode %s holds clients %s but no longer answers: taken for gone",
                            h, sorted(self.answered.get(h, {})))
                self._drop(h)
                self._failed(h, "it no longer answers", self.d.query_timeout_s, give_up=True)
                continue
            for n, cid in claims:
                if cid in still:
                    log.warning("SuperNode %s announces client %s, which live SuperNode %s holds: refused "
                                "(it may take over once %s has left)", n, cid, h, h)
                    self.refused.add((n, cid))
                else:  # the holder gave it up
                    self.answered[h].pop(cid, None)
                    del self.node_of[cid]
        self._assign()  # released ids go to the next claimant; refused claims are not probed again

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
        without either it is whoever has connected once every online SuperNode has answered (or
        has been left out: silent past ``deploy.query_timeout_s``, or refusing the run)."""
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
            # settled: every live node has answered, or stayed silent / refused (not worth waiting for)
            settled = set(self._online()) <= set(self.answered) | self.given_up
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
            msgs.append(FlowerMessage(RecordDict({RECORD: rec}), int(node), _TYPES.get(kind, "train"),
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

        alive: set[str] = set()  # clients whose node answered (an error its ClientApp raised counts)

        def arrived(cid: str, fr) -> None:
            secs = time.monotonic() - t0
            spec = (expect or {}).get(cid)
            if not fr.has_error() or fr.error.code not in _NODE_GONE:
                alive.add(cid)
            if fr.has_error():  # the reason text comes from the node: bounded before it is logged
                replies[cid] = parse_reply(cid, kind, None, bytes_down=len(down[cid]), seconds=secs,
                                           error=f"Flower error {fr.error.code}: {clean(fr.error.reason)}")
            else:
                up, err = reply_payload(fr, cid)
                replies[cid] = parse_reply(cid, kind, up, bytes_down=len(down[cid]), seconds=secs,
                                           expect=spec, error=err)
            emit_ready()

        for cid in cids:  # clients not connected: rejected now, before the exchange
            if cid not in reachable:
                replies[cid] = parse_reply(cid, kind, None, bytes_down=0, seconds=0.0,
                                           error="not connected (no SuperNode holds this client)")
        emit_ready()
        rnd = int(next((m.config.get("round", 0) for m in instructions.values()), 0))
        fields = {"round": rnd} if kind in _TYPES else {"round": rnd, "kind": kind}
        out = {cid: (self.node_of[cid], down[cid], {"cid": cid, **fields}) for cid in reachable}
        self._exchange(kind, out, timeout=self.d.round_timeout_s, on_arrival=arrived)
        for cid in reachable:  # which nodes answered their last exchange (see _assign)
            node = self.node_of.get(cid)
            if cid in alive:
                self.missed.discard(node)
            elif node is not None:
                self.missed.add(node)
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
