"""A leak audit inside a Flower federation: gradleak.flower.LeakAudit wraps FedAvg and
attacks every client's reply before FedAvg aggregates it.

Three clients hold 8 private digits each and train one SGD step per round (Flower's
message API: a ClientApp-style train function Message -> Message). Clients 1 and 2
return their updated weights (the audit turns the update back into a gradient:
(w_sent - w_returned) / lr); client 3 returns its gradient in an ArrayRecord named
"gradients". The federation runs in-process: a small Grid delivers the messages to
the train functions directly, no simulation engine. If the installed Flower still ships
the legacy strategy API, LegacyLeakAudit is shown on FedAvg's aggregate_fit too.

Run: python examples/python/flower_audit.py   (needs torch, flwr, gradleak)
"""

import logging
import warnings

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore", category=DeprecationWarning)

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import gradleak  # noqa: E402
import gradleak.flower  # noqa: E402

# what a ServerApp process is told by the SuperLink; set here as the run is in-process
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

B, LR, ROUNDS = 8, 0.1, 2
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("gradleak.flower").setLevel(logging.INFO)


def make_model():
    # float64 so that an update divided by -lr is still the gradient to ~1e-14
    return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 10)).double()


x_all, y_all, _, _ = gradleak.load_data("digits")
order = np.random.default_rng(0).permutation(len(x_all))
clients = {}
for n, node in enumerate([101, 102, 103]):
    idx = order[n * B : (n + 1) * B]
    clients[node] = (torch.tensor(x_all[idx]), torch.tensor(y_all[idx]))
SENDS_GRADIENT = {103}


def train(msg: Message, node: int) -> Message:
    """A client's train step (what a Flower ClientApp's @app.train() does)."""
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = clients[node]
    lr = msg.content["config"]["lr"]
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    if node in SENDS_GRADIENT:
        content["gradients"] = ArrayRecord(grads)
    reply = Message(content, reply_to=msg)
    return reply


class LocalGrid(Grid):
    """Delivers messages to the train functions in this process."""

    def __init__(self, nodes):
        self.nodes = list(nodes)
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            if msg.metadata.message_type.startswith("train"):
                out.append(train(msg, msg.metadata.dst_node_id))
        return out


torch.manual_seed(0)
net = make_model()
strategy = gradleak.flower.LeakAudit(FedAvg(fraction_evaluate=0.0), model=net, loss="ce")
strategy.start(
    grid=LocalGrid(clients),
    initial_arrays=ArrayRecord(net.state_dict()),
    num_rounds=ROUNDS,
    train_config=ConfigRecord({"lr": LR}),
)

print("round node   source   batch recovered exact  max rel. error  labels")
for r in strategy.records:
    x, y = clients[r["node"]]
    if "error" in r:
        print(f"{r['round']:>5} {r['node']:>4}  failed: {r['error']}")
        continue
    # compare what the audit recovered with the client's true batch
    m = gradleak.evaluate(x, r["reconstruction"], labels=y)
    print(
        f"{r['round']:>5} {r['node']:>4} {r['source']:>8} {r['batch_size']:>7} {m['recovered']:>6}/{B} {r['exact']:>5} "
        f"{np.nanmax(m['rel_errors']):>15.2e}  {m['label_accuracy']:.0%}"
    )

try:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg as LegacyFedAvg
except ImportError:
    print("legacy flwr.server.strategy not installed: LegacyLeakAudit skipped")
else:
    names = [n for n, _ in net.named_parameters()]

    class Client(ClientProxy):
        """A legacy in-process client: fit() is one SGD step on its batch."""

        def fit(self, ins, timeout, group_id):
            model = make_model()
            model.load_state_dict({n: torch.tensor(a) for n, a in zip(names, parameters_to_ndarrays(ins.parameters))})
            x, y = clients[int(self.cid)]
            nn.CrossEntropyLoss()(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            params = ndarrays_to_parameters([p.detach().numpy() for p in model.parameters()])
            return FitRes(Status(Code.OK, ""), params, len(y), {})

        def get_properties(self, ins, timeout, group_id):
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):
            raise NotImplementedError

        def evaluate(self, ins, timeout, group_id):
            raise NotImplementedError

        def reconnect(self, ins, timeout, group_id):
            raise NotImplementedError

    manager = SimpleClientManager()
    for node in (101, 102):
        manager.register(Client(str(node)))
    legacy = gradleak.flower.LegacyLeakAudit(LegacyFedAvg(min_fit_clients=2, min_available_clients=2), model=net, lr=LR, loss="ce")
    params = ndarrays_to_parameters([p.detach().numpy() for p in net.parameters()])
    instructions = legacy.configure_fit(1, params, manager)
    results = [(proxy, proxy.fit(ins, None, None)) for proxy, ins in instructions]
    legacy.aggregate_fit(1, results, [])
    for r in legacy.records:
        x, y = clients[int(r["node"])]
        m = gradleak.evaluate(x, r["reconstruction"], labels=y) if "reconstruction" in r else None
        print(
            f"legacy aggregate_fit: node {r['node']} batch {r.get('batch_size')} "
            + (f"recovered {m['recovered']}/{B}, labels {m['label_accuracy']:.0%}" if m else f"failed: {r.get('error')}")
        )
