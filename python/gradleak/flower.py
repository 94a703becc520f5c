"""Audit a Flower federation: attack every client's update before aggregating it.

    from flwr.serverapp.strategy import FedAvg
    strategy = gradleak.flower.LeakAudit(FedAvg(), model=net, lr=0.1, loss="ce")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), ...)
    strategy.records   # one dict per client and round: node, batch_size, recovered, exact

`LeakAudit` wraps a strategy of Flower's message API (`flwr.serverapp.strategy`);
`LegacyLeakAudit` wraps one of the legacy `flwr.server.strategy` API (`aggregate_fit`).
Both delegate everything to the wrapped strategy and only look at the replies.

What is attacked: the gradient a client sends under `gradient_key` (an ArrayRecord
with the model's state_dict names), else its one-step update turned back into a
gradient, (w_sent - w_returned) / lr. The update route is exact only if the client
took one plain SGD step on one batch; in float32 the subtraction costs precision
(relative error ~ eps32 |w| / (lr |g|)), so the recovered inputs are approximate and
rarely flagged exact. `model` (a torch nn.Sequential, only its structure is used)
gives the activation and the parameter names.
"""

import logging

import numpy as np

from ._api import attack
from ._model import read_model

log = logging.getLogger("gradleak.flower")


class _Auditor:
    def __init__(self, model, lr=None, gradient_key="gradients", activation=None, **attack_kwargs):
        _, self.activation, names = read_model(model, activation)
        # parameters() order (a custom module's names come with the chain order too)
        self.names = names[1] if isinstance(names, tuple) else names
        self.lr = lr
        self.gradient_key = gradient_key
        self.attack_kwargs = attack_kwargs
        self.records = []
        self._sent = None
        self._lr_round = None

    def sent(self, arrays_by_name, lr=None):
        self._sent = {n: np.asarray(arrays_by_name[n]) for n in self.names}
        self._lr_round = lr

    def audit(self, server_round, node, returned=None, gradient=None):
        """Attack one client's reply; never raises (a failed attack is logged)."""
        rec = {"round": server_round, "node": node}
        try:
            if self._sent is None:
                raise ValueError("no global model recorded for this round")
            if gradient is None:
                lr = self.lr if self.lr is not None else self._lr_round
                if not lr:
                    raise ValueError("an update needs lr= (or 'lr' in the train config) to become a gradient")
                gradient = {n: (self._sent[n].astype(np.float64) - np.asarray(returned[n], dtype=np.float64)) / lr for n in self.names}
                # the update's precision is the client's: keep its dtype
                dt = np.asarray(returned[self.names[0]]).dtype
                gradient = {n: g.astype(dt) for n, g in gradient.items()}
                rec["source"] = "update"
            else:
                rec["source"] = "gradient"
            r = attack(self._sent, gradient, activation=self.activation, **self.attack_kwargs)
            rec.update(
                batch_size=r.batch_size,
                recovered=len(r),
                exact=int(r.exact.sum()),
                labels=[int(v) for v in r.labels],
                reconstruction=r,
            )
            log.info(
                "round %s node %s (%s): batch %s, recovered %s (%s exact), labels %s",
                server_round,
                node,
                rec["source"],
                r.batch_size,
                len(r),
                rec["exact"],
                rec["labels"],
            )
        except Exception as e:  # an audit must not stop the federation
            rec["error"] = str(e)
            log.warning("round %s node %s: attack failed: %s", server_round, node, e)
        self.records.append(rec)
        return rec


def _strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


def _record_to_numpy(record):
    return {k: v.numpy() for k, v in record.items()}


class LeakAudit(_strategy_base()):
    """Wrap a `flwr.serverapp.strategy.Strategy`: attack each reply in `aggregate_train`,
    then delegate. Keyword arguments beyond these go to `gradleak.attack` (loss,
    method, batch, prior, noise_std, seed)."""

    def __init__(self, strategy, model, lr=None, gradient_key="gradients", arrays_key=None, **attack_kwargs):
        self.strategy = strategy
        self.arrays_key = arrays_key or getattr(strategy, "arrayrecord_key", "arrays")
        self._auditor = _Auditor(model, lr=lr, gradient_key=gradient_key, **attack_kwargs)

    @property
    def records(self):
        return self._auditor.records

    def __getattr__(self, name):
        return getattr(self.__dict__["strategy"], name)

    def configure_train(self, server_round, arrays, config, grid):
        lr = config.get("lr") if config is not None else None
        self._auditor.sent(_record_to_numpy(arrays), lr=lr)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            content = msg.content
            gkey = self._auditor.gradient_key
            if gkey in content.array_records:
                self._auditor.audit(server_round, node, gradient=_record_to_numpy(content.array_records[gkey]))
                # strategies expect one ArrayRecord per reply: the gradient was for us
                del content[gkey]
            elif self.arrays_key in content.array_records:
                self._auditor.audit(server_round, node, returned=_record_to_numpy(content.array_records[self.arrays_key]))
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self):
        return self.strategy.summary()


def _legacy_base():
    try:
        from flwr.server.strategy import Strategy
    except ImportError:  # a Flower without the legacy API
        return None
    return Strategy


_Legacy = _legacy_base()

if _Legacy is not None:

    class LegacyLeakAudit(_Legacy):
        """Wrap a legacy `flwr.server.strategy.Strategy`: attack each FitRes in
        `aggregate_fit`, then delegate. Parameters are matched to the model's
        parameters in `named_parameters()` order."""

        def __init__(self, strategy, model, lr=None, **attack_kwargs):
            self.strategy = strategy
            self._auditor = _Auditor(model, lr=lr, **attack_kwargs)

        @property
        def records(self):
            return self._auditor.records

        def _by_name(self, parameters):
            from flwr.common import parameters_to_ndarrays

            nd = parameters_to_ndarrays(parameters)
            if len(nd) != len(self._auditor.names):
                raise ValueError(f"{len(nd)} arrays for {len(self._auditor.names)} parameters")
            return dict(zip(self._auditor.names, nd))

        def initialize_parameters(self, client_manager):
            return self.strategy.initialize_parameters(client_manager)

        def configure_fit(self, server_round, parameters, client_manager):
            self._auditor.sent(self._by_name(parameters))
            return self.strategy.configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            for proxy, res in results:
                node = getattr(proxy, "node_id", None) or getattr(proxy, "cid", None)
                lr = res.metrics.get("lr") if res.metrics else None
                if lr is not None and self._auditor.lr is None:
                    self._auditor._lr_round = lr
                try:
                    returned = self._by_name(res.parameters)
                except ValueError as e:
                    self._auditor.records.append({"round": server_round, "node": node, "error": str(e)})
                    continue
                self._auditor.audit(server_round, node, returned=returned)
            return self.strategy.aggregate_fit(server_round, results, failures)

        def configure_evaluate(self, server_round, parameters, client_manager):
            return self.strategy.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            return self.strategy.aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round, parameters):
            return self.strategy.evaluate(server_round, parameters)
