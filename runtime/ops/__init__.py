"""What an operator runs: the command line, audit, watch, controls and the rendered
system files.
"""
