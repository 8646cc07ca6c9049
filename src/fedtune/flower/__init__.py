"""Networked federation on Flower (``pip install fedtune[flower]``).

* :mod:`~fedtune.flower.transport` — :class:`FlowerTransport`, fedtune's ``Transport`` over a
  Flower ``Grid``: the server's round loop is unchanged, only the transport differs;
* :mod:`~fedtune.flower.server_app` / :mod:`~fedtune.flower.client_app` — the Flower ServerApp and
  ClientApp wrapping fedtune's ``Server`` and ``FedClient``;
* :mod:`~fedtune.flower.node` — what a SuperNode runs (no Flower import);
* :mod:`~fedtune.flower.deploy` — ``fedtune deploy ...``: certificates, keys, SuperLink,
  SuperNode, submitting a run;
* :mod:`~fedtune.flower.certs` — a CA, the SuperLink's TLS certificate and SuperNode keys.

The wire carries fedtune's own safetensors message bytes inside a Flower ``ConfigRecord`` (Flower's
``ArrayRecord`` refuses bfloat16), so deployment and simulation exchange the same bytes.
"""

#: name of the record holding fedtune's message in every Flower message
RECORD = "fedtune"
