"""The node agent: the engine in a loop (`loop.py`), fed by a Kubernetes Secret or by the fleet
service (`fleet_source.py`), deployed by the manifests in `manifests.py`; after each pass it steps
node maintenance (`divingbell.maintenance`)."""
