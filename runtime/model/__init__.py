"""The nouns, pure: the persona, policy and fleet formats, the action catalog, scopes,
durations and the typed snapshot every detector reads.
"""
