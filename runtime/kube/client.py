"""The one way the agent reads a kubeconfig: an API client for the watch observer and
the actuators alike, with the same errors and the same transport settings."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client
from kubernetes.config import kube_config


class KubeconfigError(Exception):
    """The kubeconfig cannot be read or does not describe a usable cluster."""


def load_client(kubeconfig: Path) -> client.ApiClient:
    """An API client for a kubeconfig, with urllib3's own retries off.

    Callers retry with their own backoff and log each attempt; urllib3's silent
    immediate retries would only hide them. The file is never written back.
    """
    configuration = client.Configuration()
    try:
        kube_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig),
            client_configuration=configuration, persist_config=False)
    except Exception as exc:
        # The loader raises whatever its YAML, base64 and file layers raise; to the
        # agent they all mean one thing: this kubeconfig cannot be used.
        raise KubeconfigError(f"kubeconfig {kubeconfig}: {type(exc).__name__}: {exc}") from exc
    configuration.retries = False
    return client.ApiClient(configuration)
