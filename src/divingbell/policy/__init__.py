"""Cluster policy for shared clusters: admission webhooks and tenant accounts.

`admission` (pure policy decisions), `server` (the HTTPS webhook), `config` (policy and tenant
files), `kube` (the Kubernetes edge), `tenants` (the account controller), `credentials` and
`kubeconfig` (client certificates and their safe delivery), `manifests` (what to deploy).
"""
