"""model/: values and the domain.

Replies, errors, envelopes, records, outcomes, config; no I/O, no asyncio, no clock.
"""
