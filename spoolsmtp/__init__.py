"""spoolsmtp: a batch mail spool processor modelled on the VM/MVS SMTP service machine."""

__version__ = "0.1.0"
