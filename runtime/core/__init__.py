"""The decisions, pure: detectors, the policy engine, authorization, and the ports
(what an observer and an actuator look like). No I/O, not even indirectly.
"""
