"""policy/: pure queue decisions, with now and randomness passed in.

Retries, the fate of an envelope, reports.
"""
