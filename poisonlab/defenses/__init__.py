"""Defences: methods that try to take a backdoor out of a model, and how to score them.

`metrics` holds the removal scores shared by every method (persistence lives in
`poisonlab.evaluate`); the methods themselves (`conf/safety/`) are chosen by `safety=<name>`.
"""
