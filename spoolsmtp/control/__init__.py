"""control/: the operator channel.

The port the worker implements, commands, the sockets, the client.
"""
