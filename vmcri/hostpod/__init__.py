"""Host sandboxes: pods that ask for the node's network, PID or IPC namespace (or the
`host` runtime handler) run without a VM. Their containers run on the host under crun,
each watched by conmon (CRI-O's monitor), so they outlive daemon restarts.

runtime.py  how crun and conmon are invoked on this host (cgroup hybrid workaround)
sandbox.py  the pod's namespaces (pinned files, an infra process for a shared PID ns),
            its etc files and /dev/shm
conmon.py   start a container under conmon; exit files, the attach socket, ctl fifos
spec.py     the OCI spec from vmcri.container.ocispec, adjusted for the host
stream.py   local processes and the attach socket as ProcessStreams for streaming
runner.py   HostEngine: the container operations, the host implementation of
            vmcri.container.engine.ContainerEngine
"""
