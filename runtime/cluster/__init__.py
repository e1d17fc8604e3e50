"""A real Kubernetes control plane for the tests and the lab, and the agents' Kubernetes side.

``building`` builds the pinned kube-apiserver, kube-controller-manager and etcd;
``controlplane`` runs them on loopback; ``nodesim`` stands in for kubelets and the
scheduler.
"""
