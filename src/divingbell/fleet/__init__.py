"""The fleet service: inventory, roles, install grants and the API machines and operators use."""
