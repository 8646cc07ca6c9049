"""Offsite tuning (FedOT, LocalOT): clients fine-tune a model they never receive.

After Xiao, Lin & Han 2023, "Offsite-Tuning: Transfer Learning without Full Model"
(https://arxiv.org/abs/2302.04870) and its federated version in FS-LLM (arXiv 2309.00363 §6.3);
re-alignment after FedBiOT (Wu et al. 2024, https://arxiv.org/abs/2406.17706).

The server owns the full model. It cuts it into an *adapter* (the bottom and top transformer
blocks, trained) and an *emulator* (the middle blocks, uniformly layer-dropped and optionally
distilled, frozen), sends each client the emulator once (safetensors, identified by its content
hash) and then only the adapter each round. Clients train the adapter on the emulator; the server
aggregates it with any ``fl.algorithm`` and plugs it back into the full model.

Modules (docs/offsite.md is the guide):

* :mod:`.config` — the ``offsite`` config section (no torch);
* :mod:`.plan` — which blocks are adapter, kept and dropped (the uniform-drop rule; no torch);
* :mod:`.emulator` — building the emulator and the client's model from a config, the emulator file,
  plugging an adapter back into the full model;
* :mod:`.distill` — distillation before federation and per-round re-alignment (KD loss);
* :mod:`.transfer` — the emulator in chunks to clients, and what a client keeps of it;
* :mod:`.algorithm` — :class:`~fedtune.offsite.algorithm.Offsite`, the wrapper that adds all of
  this to any aggregation rule;
* :mod:`.roles` — the models by role for the simulation, the deployed server and a SuperNode;
* :mod:`.evaluation` — ``fedtune eval`` targets ``emulator`` and ``plugin``, and their gap;
* :mod:`.export` — the plug-in model as a plain Hugging Face directory (``fedtune offsite export``).

Importing this package imports no torch (the config module needs it torch-free).
"""
