"""Cluster policy for shared clusters: admission webhooks and tenant accounts.

`admission` (pure policy decisions), `server` (the HTTPS webhook), `config` (policy and tenant
files), `tenants` (the account controller), `credentials` and `kubeconfig` (client
certificates and their safe delivery), `manifests` (what to deploy). They reach Kubernetes
through `divingbell.kube`, as the agent does.
"""

# How the webhook and the tenant controller sign what they write (managedFields).
FIELD_MANAGER = "divingbell-policy"
