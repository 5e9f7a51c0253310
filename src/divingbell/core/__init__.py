"""The host configuration core: a document (`document/`) planned and applied by the engine
(`engine/`) through one module per area (`modules/`), every file and command on a root going
through `host.py` (`safepath.py` keeps them inside it). Nothing here imports the fleet, the
CLI or Kubernetes: every other part builds on this one."""
