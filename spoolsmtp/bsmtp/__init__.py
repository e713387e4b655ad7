"""bsmtp/: the envelope language, pure.

Reading, parameters, addresses, writing, the batch response.
"""
