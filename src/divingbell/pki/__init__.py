"""A cluster's PKI from a Promenade-style catalog: CAs, certificates and keypairs generated
with `cryptography`, reused while they still match (`generate`), inspected and renewed
(`check`). Service-side: the node agent never imports this package."""
