"""Every call to systemd and the host: unit and health observers, host actuators,
sd_notify.
"""
