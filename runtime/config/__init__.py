"""Reading the operator's files and secrets: persona, policy and fleet files with
file:line:field errors, credentials, prompt templates.
"""
