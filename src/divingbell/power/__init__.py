"""Out-of-band power through machines' BMCs: Redfish (sushy) and IPMI (pyghmi).

`bmc.py` is the edge (one adapter per protocol, no hand-written protocol code), `control.py`
the decisions (a state is acted on only once confirmed; every change is read back), and
`secrets.py` the encryption of BMC credentials at rest. Nothing here knows the store or HTTP:
`fleet/power.py` and `fleet/api/power.py` put it in the fleet service.
"""
