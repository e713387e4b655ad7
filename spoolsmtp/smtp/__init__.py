"""smtp/: the SMTP client.

The pure protocol and transaction rules, and the asyncio session that drives them.
"""
