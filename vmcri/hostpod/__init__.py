"""Host sandboxes: pods that ask for the node's network, PID or IPC namespace (or the
`host` runtime handler) run without a VM. Their containers run on the host under crun,
each watched by conmon (CRI-O's monitor), so they outlive daemon restarts.
docs/host-sandboxes.md says what runs where and why.

pods.py        the sandbox RPCs for host pods (run, stop, refresh, reconcile, status)
sandbox.py     the pod's namespaces (pinned files, an infra process for a shared PID ns),
               its etc files and /dev/shm
containers.py  CreateContainer's host bundle
agent.py       HostAgent: the container operations the container RPCs call through
               svc.agent_for(), answered on the host instead of by a guest agent
runner.py      HostEngine: those operations over crun and conmon
conmon.py      start a container under conmon; exit files, the attach socket, ctl fifos
spec.py        the OCI spec from vmcri.container.ocispec, adjusted for the host
stream.py      local processes, consoles and the attach socket as ProcessStreams
cgroups.py     a host container's cgroup (v1 or v2) as a stats sample
runtime.py     how crun and conmon are invoked on this host (cgroup hybrid workaround)
"""
