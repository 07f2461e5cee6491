"""Guest side of vmcri: the agent that runs as PID 1 inside every pod VM.

Imports only the stdlib, paramiko, and modules of this package (it is installed in the
guest as `vmcri_agent`, so imports inside it are relative). `protocol` is shared with the
host (vmcri.channel) and is stdlib-only.
"""
