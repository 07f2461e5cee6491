"""Host side of the agent channel: one persistent SSH connection per VM over the
virtio-serial unix socket (qemu is the server side of that socket).

The guest is hostile: every read is bounded in size and time. A garbage banner, an
oversized packet or reply, or a changed host key closes this VM's connection with a
logged error and raises; nothing outside this client is touched. Every reply is checked
field by field (vmcri/agent/replies.py) before a caller sees it: a reply that does not fit
fails that one call with AgentProtocolError.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time

import paramiko
from paramiko.channel import Channel
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from vmcri.agent import protocol, replies, sync

log = logging.getLogger(__name__)

PRE_AUTH_BYTE_LIMIT = 256 * 1024   # banner + key exchange never need more
MAX_PACKET_BYTES = 256 * 1024      # paramiko itself has no upper bound on a packet
DEFAULT_MAX_OUTPUT = 16 << 20      # per stream, for run()
MAX_UNREAD_BYTES = 8 << 20         # per channel; a well-behaved guest stops at the 2 MiB window
# A connection attempt's wait for the sync echo, then for the SSH handshake; doubled at each
# retry. A HELLO can be lost at a quick reconnect (the guest may see the new connection's
# bytes before the old one's hang-up, and end the session it just began), and only a new
# connection with a new HELLO recovers from that, so no single wait takes the whole deadline.
ECHO_WAIT_S = 3.0
HANDSHAKE_WAIT_S = 15.0


class AgentError(Exception):
    """The agent answered with an error, or broke the protocol."""

    def __init__(self, message: str, kind: str = "Failed"):
        super().__init__(message)
        self.kind = kind


class AgentTimeout(AgentError):
    def __init__(self, message: str):
        super().__init__(message, "DeadlineExceeded")


class _AttemptTimedOut(AgentTimeout):
    """One connection attempt ran out of its own budget; the deadline has time left."""


class AgentProtocolError(AgentError):
    def __init__(self, message: str):
        super().__init__(message, "ProtocolError")


class AgentUnavailable(AgentError):
    """The VM's agent socket cannot be connected (VM gone or not started)."""

    def __init__(self, message: str):
        super().__init__(message, "Unavailable")


class _BoundedSocket:
    """Socket proxy that caps what the guest may send before authentication finishes."""

    def __init__(self, sock: socket.socket, prefix: bytes = b""):
        self._sock = sock
        self._prefix = prefix   # read past the session sync, handed to paramiko first
        self.received = 0
        self.authed = False

    def recv(self, n):
        if self._prefix:
            data, self._prefix = self._prefix[:n], self._prefix[n:]
        else:
            data = self._sock.recv(n)
        if not self.authed:
            self.received += len(data)
            if self.received > PRE_AUTH_BYTE_LIMIT:
                raise paramiko.SSHException(f"guest sent more than {PRE_AUTH_BYTE_LIMIT} bytes before authentication")
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _bound_packets(transport: paramiko.Transport) -> None:
    pk = transport.packetizer
    orig = pk.read_all

    def read_all(n, check_rekey=False):
        if n > MAX_PACKET_BYTES:
            raise paramiko.SSHException(f"guest announced a {n}-byte packet (limit {MAX_PACKET_BYTES})")
        return orig(n, check_rekey)

    pk.read_all = read_all


def _feed_within_window(handler):
    def feed(chan, m):
        if len(chan.in_buffer) + len(chan.in_stderr_buffer) > MAX_UNREAD_BYTES:
            # paramiko does not enforce the window it advertised; a guest ignoring it
            # would grow our buffers without bound. The transport closes on this error.
            raise paramiko.SSHException("guest ignores the SSH flow-control window")
        handler(chan, m)
    return feed


class _HostTransport(paramiko.Transport):
    _channel_handler_table = dict(paramiko.Transport._channel_handler_table)
    _channel_handler_table[MSG_CHANNEL_DATA] = _feed_within_window(Channel._feed)
    _channel_handler_table[MSG_CHANNEL_EXTENDED_DATA] = _feed_within_window(Channel._feed_extended)


def _remaining(deadline: float) -> float:
    r = deadline - time.monotonic()
    if r <= 0:
        raise AgentTimeout("agent call timed out")
    return r


def checked_exit_status(chan: paramiko.Channel) -> int | None:
    """The channel's exit-status (None: none came); AgentProtocolError outside 0..255."""
    st = chan.exit_status
    if st == -1:
        return None
    try:
        return replies.exit_code("exit-status", st)
    except protocol.ProtocolError as e:
        raise AgentProtocolError(f"agent process: {e}") from e


class ProcessStream:
    """A process in the guest, streamed over one SSH channel (see protocol.py)."""

    def __init__(self, chan: paramiko.Channel, head: dict, leftover: bytes):
        try:
            head = replies.check_head(head)
        except protocol.ProtocolError as e:
            chan.close()
            raise AgentProtocolError(f"agent stream head: {e}") from e
        self.channel = chan
        self.id = head.get("id")
        self.pid = head.get("pid")
        self.dropped = head["dropped"]
        # where a log-pump attach starts, per stream ({"stdout": N, "stderr": M}); None otherwise
        self.offsets = head.get("offsets")
        self._leftover = leftover

    def recv(self, n: int = 65536, timeout: float | None = None) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return data
        self.channel.settimeout(timeout)
        return self.channel.recv(n)

    def recv_stderr(self, n: int = 65536, timeout: float | None = None) -> bytes:
        self.channel.settimeout(timeout)
        return self.channel.recv_stderr(n)

    def send(self, data: bytes) -> None:
        self.channel.sendall(data)

    def close_stdin(self) -> None:
        self.channel.shutdown_write()

    def signal(self, name: str) -> None:
        protocol.check_signal(name)
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(self.channel.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string(name)
        self.channel.transport._send_user_message(m)

    def resize(self, cols: int, rows: int) -> None:
        self.channel.resize_pty(width=cols, height=rows)

    def exit_status(self, timeout: float | None = None) -> int | None:
        """Exit code (128+N for signal N); None if the channel closed without one.
        AgentProtocolError when the guest sent one outside 0..255."""
        if not self.channel.status_event.wait(timeout):
            raise AgentTimeout("process did not exit in time")
        return checked_exit_status(self.channel)

    def close(self) -> None:
        self.channel.close()


class AgentClient:
    def __init__(self, socket_path: str, connect_timeout: float = 10.0, call_timeout: float = 30.0,
                 max_output: int = DEFAULT_MAX_OUTPUT, name: str = "", on_call=None):
        self.socket_path = socket_path
        self.on_call = on_call  # fn(method, seconds) after each answered control call
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.max_output = max_output
        self.name = name or socket_path
        self.host_key_fingerprint: str | None = None
        self.legacy = False  # the VM's agent predates the session sync (older guest image)
        self._transport: paramiko.Transport | None = None
        self._lock = threading.Lock()
        self.stats_retries = 0  # connection attempts that timed out and were made again

    # -- connection ---------------------------------------------------------------
    def _connect(self, deadline: float, attempt: int = 0) -> paramiko.Transport:
        """One connection: the session sync, then SSH. Its waits are bounded by the attempt's
        budget as well as by `deadline`; running out of the budget is _AttemptTimedOut."""
        scale = 2 ** min(attempt, 4)
        echo_by = min(deadline, time.monotonic() + ECHO_WAIT_S * scale)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(echo_by))
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise AgentUnavailable(f"cannot connect to agent socket {self.socket_path}: {e}") from e
        except BaseException:
            sock.close()
            raise
        try:
            banner_start = b""
            if not self.legacy:
                hello = sync.new_hello()
                sock.sendall(hello)
                banner_start = sync.await_echo(sock.recv, hello)
            bounded = _BoundedSocket(sock, banner_start)
            t = _HostTransport(bounded)
        except BaseException as e:
            sock.close()
            if isinstance(e, sync.LegacyAgent):
                # a pod booted before a vmcri upgrade: talk to it the old way from now on
                log.warning("agent %s predates the session sync; reconnecting without it", self.name)
                self.legacy = True
                raise AgentProtocolError(f"agent session sync: {e}") from e
            if isinstance(e, socket.timeout):
                if echo_by < deadline:
                    raise _AttemptTimedOut("agent did not answer the session sync in time") from e
                raise AgentTimeout("agent did not answer the session sync in time") from e
            if isinstance(e, (OSError, sync.SyncError)):
                log.error("agent %s: session sync failed: %s", self.name, e)
                raise AgentProtocolError(f"agent session sync failed: {e}") from e
            raise
        shake_by = min(deadline, time.monotonic() + HANDSHAKE_WAIT_S * scale)
        try:
            _bound_packets(t)
            t.banner_timeout = t.handshake_timeout = t.auth_timeout = _remaining(shake_by)
            t.start_client(timeout=_remaining(shake_by))
            key = t.get_remote_server_key()
            fp = "SHA256:" + hashlib.sha256(key.asbytes()).hexdigest()
            if self.host_key_fingerprint is None:
                self.host_key_fingerprint = fp
            elif fp != self.host_key_fingerprint:
                raise AgentProtocolError(f"agent host key changed ({self.host_key_fingerprint} -> {fp})")
            t.auth_none("vmcri")
            if not t.is_authenticated():
                raise AgentProtocolError("agent refused auth none")
            bounded.authed = True
            return t
        except BaseException as e:
            t.close()
            if isinstance(e, (paramiko.SSHException, EOFError)) and shake_by < deadline \
                    and time.monotonic() >= shake_by - 0.5:
                raise _AttemptTimedOut(f"agent handshake did not finish in time: {e}") from e
            if isinstance(e, (paramiko.SSHException, EOFError)):
                log.error("agent %s: handshake failed: %s", self.name, e)
                raise AgentProtocolError(f"agent handshake failed: {e}") from e
            raise

    def _ensure(self, deadline: float) -> paramiko.Transport:
        with self._lock:
            t = self._transport
            if t is not None and t.is_active():
                return t
            self._transport = None
            last = None
            # A protocol error is retried twice, for an agent still tearing down the old
            # session (a garbage-sending guest fails fast); an attempt that timed out is
            # retried until the deadline, each time waiting longer.
            failures = attempt = 0
            while failures < 3:
                try:
                    self._transport = self._connect(deadline, attempt)
                    return self._transport
                except _AttemptTimedOut as e:
                    attempt += 1
                    self.stats_retries += 1
                    # routine while a guest boots (its agent is not reading yet)
                    log.info("agent %s: %s; retrying on a new connection (attempt %d)",
                             self.name, e, attempt + 1)
                    continue
                except AgentProtocolError as e:
                    failures += 1
                    if "host key changed" in str(e):
                        raise
                    last = e
                    if time.monotonic() >= deadline:
                        raise AgentTimeout(f"agent connect timed out ({e})") from e
                    time.sleep(0.05)
            raise last

    def _drop(self, why: str) -> None:
        with self._lock:
            t, self._transport = self._transport, None
        if t is not None:
            log.error("agent %s: closing connection: %s", self.name, why)
            t.close()

    def close(self) -> None:
        with self._lock:
            t, self._transport = self._transport, None
        if t is not None:
            t.close()

    @property
    def connected(self) -> bool:
        t = self._transport
        return t is not None and t.is_active()

    def wait_ready(self, timeout: float) -> dict:
        """Connect and ping until the agent answers (socket may not exist yet)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.call("ping", timeout=max(0.1, deadline - time.monotonic()))
            except (OSError, AgentTimeout, AgentProtocolError, AgentUnavailable) as e:
                last = e
                self._drop(f"not ready: {e}") if self._transport else None
                time.sleep(0.1)
        raise AgentTimeout(f"agent not ready after {timeout:.0f}s: {last}")

    # -- calls --------------------------------------------------------------------
    def _open(self, command: str, deadline: float, pty: tuple[int, int] | None = None) -> paramiko.Channel:
        t = self._ensure(deadline)
        try:
            chan = t.open_session(timeout=_remaining(deadline))
        except paramiko.SSHException as e:
            if not t.is_active():
                self._drop(str(e))
            raise AgentError(f"opening agent channel failed: {e}") from e
        # exec_command/get_pty wait without a timeout: a watchdog closes the channel
        expired = threading.Event()

        def expire():
            expired.set()
            chan.close()
        timer = threading.Timer(_remaining(deadline), expire)
        timer.daemon = True
        timer.start()
        try:
            if pty is not None:
                chan.get_pty(term="xterm", width=pty[0], height=pty[1])
            chan.exec_command(command)
        except paramiko.SSHException as e:
            chan.close()
            # the watchdog may fire a hair before `deadline` by the monotonic clock
            if expired.is_set() or time.monotonic() >= deadline:
                raise AgentTimeout("agent did not answer the exec request in time") from e
            raise AgentError(f"agent exec request failed: {e}") from e
        finally:
            timer.cancel()
        return chan

    def _read_head(self, chan: paramiko.Channel, deadline: float) -> tuple[dict, bytes]:
        buf = b""
        while b"\n" not in buf:
            if len(buf) > protocol.MAX_REPLY_BYTES:
                chan.close()
                self._drop("reply exceeds the size limit")
                raise AgentProtocolError(f"agent reply larger than {protocol.MAX_REPLY_BYTES} bytes")
            chan.settimeout(_remaining(deadline))
            try:
                data = chan.recv(65536)
            except socket.timeout:
                chan.close()
                raise AgentTimeout("agent call timed out") from None
            if not data:
                chan.close()
                raise AgentProtocolError("agent closed the channel without a reply")
            buf += data
        line, _, rest = buf.partition(b"\n")
        try:
            msg = protocol.decode_reply(line)
        except protocol.ProtocolError as e:
            chan.close()
            self._drop(f"bad reply: {e}")
            raise AgentProtocolError(str(e)) from e
        if not msg["ok"]:
            chan.close()
            raise AgentError(msg["error"]["message"], msg["error"]["type"])
        return msg.get("result", {}), rest

    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        if method in protocol.STREAMING:
            raise ValueError(f"method: {method} is a streaming call; use run/open_process/attach")
        command = protocol.encode_request(method, params)
        started = time.monotonic()
        deadline = started + (timeout if timeout is not None else self.call_timeout)
        chan = self._open(command, deadline)
        try:
            result, _ = self._read_head(chan, deadline)
        finally:
            chan.close()
        try:
            result = replies.check_result(method, result)
        except protocol.ProtocolError as e:
            log.warning("agent %s: bad %s reply: %s", self.name, method, e)
            raise AgentProtocolError(f"agent {method} reply: {e}") from e
        if self.on_call is not None:
            self.on_call(method, time.monotonic() - started)
        return result

    def open_process(self, argv: list[str] | None, env: dict | None = None, cwd: str = "/",
                     tty: bool = False, stdin: bool = False, id: str | None = None,
                     size: tuple[int, int] = (80, 24), timeout: float | None = None,
                     container_exec: dict | None = None) -> ProcessStream:
        """A process in the guest: argv, or with container_exec ({"id", "token", "process"})
        `crun exec` of that OCI process in a container (the agent makes the argv)."""
        params = {"env": env or {}, "cwd": cwd, "tty": tty, "stdin": stdin}
        if container_exec is not None:
            params["container_exec"] = container_exec
        else:
            params["argv"] = argv
        if id is not None:
            params["id"] = id
        command = protocol.encode_request("run", params)
        deadline = time.monotonic() + (timeout if timeout is not None else self.call_timeout)
        chan = self._open(command, deadline, pty=size if tty else None)
        head, rest = self._read_head(chan, deadline)
        chan.settimeout(None)
        return ProcessStream(chan, head, rest)

    def attach(self, id: str, stdin: bool = False, live: bool = False,
               timeout: float | None = None, offsets: dict | None = None) -> ProcessStream:
        """Resume a process's stream. `live` (containers only): output from now on, never
        the replay buffer that the log pump reads. `offsets` (the log pump): bytes of each
        stream already written; the replay starts after them."""
        params = {"id": id, "stdin": stdin, "live": live}
        if offsets is not None:
            params["offsets"] = offsets
        command = protocol.encode_request("attach", params)
        deadline = time.monotonic() + (timeout if timeout is not None else self.call_timeout)
        chan = self._open(command, deadline)
        head, rest = self._read_head(chan, deadline)
        chan.settimeout(None)
        return ProcessStream(chan, head, rest)

    def open_port_forward(self, port: int, host: str = "127.0.0.1", timeout: float | None = None) -> paramiko.Channel:
        """A byte stream to host:port inside the guest (a direct-tcpip channel: send/recv/
        shutdown/close like a socket). Refused or closed ports raise AgentError."""
        if host not in protocol.FORWARD_HOSTS:
            raise ValueError(f"host: {host!r} is not one of {', '.join(protocol.FORWARD_HOSTS)}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port: {port!r} is not a TCP port")
        deadline = time.monotonic() + (timeout if timeout is not None else self.call_timeout)
        t = self._ensure(deadline)
        try:
            return t.open_channel("direct-tcpip", dest_addr=(host, port), src_addr=("127.0.0.1", 0),
                                  timeout=_remaining(deadline))
        except paramiko.ChannelException as e:
            raise AgentError(f"port-forward to {host}:{port} in the guest refused: {e.text}",
                             "Unavailable") from e
        except paramiko.SSHException as e:
            if not t.is_active():
                self._drop(str(e))
            raise AgentError(f"port-forward to {host}:{port} failed: {e}") from e

    def run(self, argv: list[str] | None, stdin: bytes | None = None, timeout: float | None = None,
            env: dict | None = None, cwd: str = "/", max_output: int | None = None,
            container_exec: dict | None = None) -> tuple[int, bytes, bytes]:
        """ExecSync-style: (exit code, stdout, stderr), each stream capped at max_output bytes
        (the rest is read and discarded). On timeout the process is killed and AgentTimeout raised."""
        cap = self.max_output if max_output is None else max_output
        deadline = time.monotonic() + (timeout if timeout is not None else self.call_timeout)
        if argv is None:
            argv = ["exec in " + container_exec["id"][:12]]  # for the messages only
            proc = self.open_process(None, env=env, cwd=cwd, stdin=stdin is not None,
                                     timeout=_remaining(deadline), container_exec=container_exec)
        else:
            proc = self.open_process(argv, env=env, cwd=cwd, stdin=stdin is not None,
                                     timeout=_remaining(deadline))
        chan = proc.channel
        try:
            if stdin:
                chan.settimeout(_remaining(deadline))
                chan.sendall(stdin)
            chan.shutdown_write()
            out = bytearray(proc._leftover[:cap])
            proc._leftover = b""
            err = bytearray()
            while True:
                got = False
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)[: max(0, cap - len(err))]
                    got = True
                if chan.recv_ready():
                    out += chan.recv(65536)[: max(0, cap - len(out))]
                    got = True
                if got:
                    continue
                if (chan.eof_received or chan.closed) and chan.exit_status_ready():
                    break
                if chan.closed:
                    break
                if time.monotonic() >= deadline:
                    raise AgentTimeout(f"run {argv[0]!r}: no exit within the timeout")
                if chan.exit_status_ready():
                    time.sleep(0.001)
                else:
                    chan.status_event.wait(0.005)
            status = proc.exit_status(timeout=max(0.01, deadline - time.monotonic()))
            if status is None:
                raise AgentError(f"run {argv[0]!r}: channel closed without an exit status")
            return status, bytes(out), bytes(err)
        except AgentTimeout:
            try:
                proc.signal("KILL")
            except Exception:
                pass
            raise
        finally:
            chan.close()
