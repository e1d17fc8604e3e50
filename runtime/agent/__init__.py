"""One persona's process: the loop, the bus link and voter, observing, acting,
deliberation, metrics and logs.
"""
