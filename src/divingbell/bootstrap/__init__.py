"""Bootstrap: a design (cluster, roles, nodes) built into self-contained genesis and join
scripts (`build`), node labels through the Kubernetes adapter (`labels`), and teardown.
Service-side: the node agent never imports this package."""
