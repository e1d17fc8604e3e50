"""The optional model brain: a model may pick among a policy's remedies, and never acts.

Layers, each importable alone: ``prompting`` renders a persona's Jinja2 prompt from
what the agent saw; ``choosing`` offers catalog actions as tools and turns a reply's
tool calls into candidates (or discards, each with its reason); ``asking`` is the only
module that talks to the Anthropic API; ``deliberating`` runs a deliberation off the
tick's path and hands the agent intents, falling back to the rules brain.
"""
