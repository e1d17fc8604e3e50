"""Every call to the Kubernetes API server: the watch observer and the actuators.
"""
