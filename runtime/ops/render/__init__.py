"""System files rendered from the persona files: NATS permissions, Kubernetes RBAC,
polkit rules and unit drop-ins.
"""
