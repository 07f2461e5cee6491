"""CNI invocation: config loading, plugin chains (ADD/CHECK/DEL), result cache.

Behaves like libcni as the kubelet's runtimes use it: the first config file in the conf dir
by name wins, a single-plugin `.conf`/`.json` is wrapped into a list, each plugin gets the
previous one's result as `prevResult`, DEL runs the chain in reverse, and `runtimeConfig`
carries only the capabilities a plugin declares.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field

from vmcri import errors

log = logging.getLogger(__name__)

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
MAX_CONF_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 1 << 20
STDERR_TAIL = 4096
_PLUGIN_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class CNIConfigError(errors.FailedPrecondition):
    """No usable network config: the runtime reports NetworkReady=false/NoCNIConfig."""


class CNIPluginError(errors.VmcriError):
    """A plugin failed; the message carries its error JSON and stderr."""

    def __init__(self, message: str, plugin: str = "", code: int | None = None,
                 stderr: str = ""):
        super().__init__(message)
        self.plugin = plugin
        self.cni_code = code
        self.stderr = stderr


def parse_version(v) -> tuple[int, int, int]:
    if not v:
        return (0, 1, 0)  # the spec's default when cniVersion is absent
    if not isinstance(v, str) or not re.match(r"^\d+\.\d+\.\d+$", v):
        raise ValueError(f"cniVersion {v!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(x) for x in v.split("."))
    return (major, minor, patch)


@dataclass
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: list[dict]
    disable_check: bool = False
    source: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "cniVersion": self.cni_version,
                "disableCheck": self.disable_check, "plugins": self.plugins,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "NetworkConfigList":
        return _validate_list(d, source or d.get("source", ""))


def _validate_list(raw, source: str) -> NetworkConfigList:
    if not isinstance(raw, dict):
        raise CNIConfigError(f"{source}: expected a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CNIConfigError(f"{source}: 'name' must be a non-empty string")
    version = raw.get("cniVersion", "")
    try:
        parse_version(version)
    except ValueError as e:
        raise CNIConfigError(f"{source}: {e}") from None
    plugins = raw.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIConfigError(f"{source}: 'plugins' must be a non-empty list")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict):
            raise CNIConfigError(f"{source}: plugins[{i}] must be an object")
        t = p.get("type")
        if not isinstance(t, str) or not _PLUGIN_TYPE_RE.match(t):
            raise CNIConfigError(f"{source}: plugins[{i}].type {t!r} is not a plugin name")
    disable_check = raw.get("disableCheck", False)
    if isinstance(disable_check, str):  # libcni accepts "true"/"false" strings too
        disable_check = disable_check.lower() == "true"
    return NetworkConfigList(name=name, cni_version=version, plugins=plugins,
                             disable_check=bool(disable_check), source=source)


def load_config_file(path: str) -> NetworkConfigList:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except OSError as e:
        raise CNIConfigError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_CONF_BYTES:
        raise CNIConfigError(f"{path}: larger than {MAX_CONF_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIConfigError(f"{path}: invalid JSON: {e}") from None
    if path.endswith(".conflist"):
        return _validate_list(raw, path)
    # a single plugin config: wrap it, keeping its name and version at list level
    if not isinstance(raw, dict):
        raise CNIConfigError(f"{path}: expected a JSON object")
    if "plugins" in raw:
        raise CNIConfigError(f"{path}: a plugin list must use the .conflist extension")
    wrapped = {"name": raw.get("name"), "cniVersion": raw.get("cniVersion", ""),
               "plugins": [raw]}
    return _validate_list(wrapped, path)


def find_config(conf_dir: str) -> NetworkConfigList:
    """The first config file by name, like containerd and CRI-O."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CONF_EXTENSIONS))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise CNIConfigError(f"cannot read CNI config dir {conf_dir}: {e.strerror}") from None
    files = [os.path.join(conf_dir, n) for n in names
             if os.path.isfile(os.path.join(conf_dir, n))]
    if not files:
        raise CNIConfigError(f"no network config found in {conf_dir}")
    return load_config_file(files[0])


@dataclass
class RuntimeConf:
    container_id: str
    netns: str  # "" when the namespace is gone (allowed on DEL)
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict = field(default_factory=dict)

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


class CNIRuntime:
    def __init__(self, bin_dirs: list[str], timeout_s: float = 60.0):
        self.bin_dirs = list(bin_dirs)
        self.timeout_s = timeout_s

    # -- plugins --------------------------------------------------------------
    def find_plugin(self, ptype: str) -> str:
        for d in self.bin_dirs:
            p = os.path.join(d, ptype)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise CNIPluginError(
            f"CNI plugin {ptype!r} not found in {', '.join(self.bin_dirs)}", plugin=ptype)

    def _plugin_conf(self, net: NetworkConfigList, plugin: dict, rt: RuntimeConf,
                     prev_result: dict | None) -> dict:
        conf = dict(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.cni_version
        conf.pop("prevResult", None)
        if prev_result is not None:
            conf["prevResult"] = prev_result
        caps = plugin.get("capabilities")
        runtime_config = {}
        if isinstance(caps, dict):
            for cap, enabled in caps.items():
                if enabled is True and cap in rt.capability_args:
                    runtime_config[cap] = rt.capability_args[cap]
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        else:
            conf.pop("runtimeConfig", None)
        return conf

    def exec_plugin(self, command: str, net: NetworkConfigList, plugin: dict,
                    rt: RuntimeConf, prev_result: dict | None) -> dict | None:
        ptype = plugin["type"]
        path = self.find_plugin(ptype)
        conf = self._plugin_conf(net, plugin, rt, prev_result)
        env = dict(os.environ)
        env.update({
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rt.container_id,
            "CNI_NETNS": rt.netns,
            "CNI_IFNAME": rt.ifname,
            "CNI_ARGS": rt.cni_args(),
            "CNI_PATH": os.pathsep.join(self.bin_dirs),
        })
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        what = f"CNI plugin {ptype!r} ({path}) {command} for {rt.container_id[:12]}"
        try:
            proc = _run_bounded([path], json.dumps(conf).encode(), env, self.timeout_s)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-STDERR_TAIL:].decode("utf-8", "replace")
            raise errors.DeadlineExceeded(
                f"{what} timed out after {self.timeout_s:g}s; stderr: {tail.strip()!r}") from None
        except OSError as e:
            raise CNIPluginError(f"{what}: cannot execute: {e.strerror}", plugin=ptype) from None
        stderr = proc.stderr[-STDERR_TAIL:].decode("utf-8", "replace").strip()
        stdout = proc.stdout[:MAX_OUTPUT_BYTES]
        if proc.returncode != 0:
            raise _plugin_failure(what, ptype, proc.returncode, stdout, stderr)
        if stderr:
            log.debug("%s stderr: %s", what, stderr)
        if command != "ADD":
            return None
        try:
            result = json.loads(stdout)
        except ValueError:
            raise CNIPluginError(f"{what}: result is not JSON: {stdout[:200]!r}; "
                                 f"stderr: {stderr!r}", plugin=ptype, stderr=stderr) from None
        if not isinstance(result, dict):
            raise CNIPluginError(f"{what}: result is not a JSON object", plugin=ptype)
        return result

    # -- chains ---------------------------------------------------------------
    def add(self, net: NetworkConfigList, rt: RuntimeConf) -> dict:
        result = None
        for plugin in net.plugins:
            result = self.exec_plugin("ADD", net, plugin, rt, result)
        return result or {}

    def check(self, net: NetworkConfigList, rt: RuntimeConf, prev_result: dict) -> None:
        if parse_version(net.cni_version) < (0, 4, 0):
            raise errors.FailedPrecondition(
                f"CNI network {net.name!r}: cniVersion {net.cni_version} does not support CHECK")
        if net.disable_check:
            return
        for plugin in net.plugins:
            self.exec_plugin("CHECK", net, plugin, rt, prev_result)

    def delete(self, net: NetworkConfigList, rt: RuntimeConf,
               prev_result: dict | None) -> None:
        """Reverse order; every plugin is tried so one failure does not leak the rest."""
        if parse_version(net.cni_version) < (0, 4, 0):
            prev_result = None  # prevResult on DEL came with 0.4.0
        failures = []
        for plugin in reversed(net.plugins):
            try:
                self.exec_plugin("DEL", net, plugin, rt, prev_result)
            except (CNIPluginError, errors.DeadlineExceeded) as e:
                failures.append(e)
        if failures:
            if len(failures) == 1:
                raise failures[0]
            raise CNIPluginError("; ".join(str(f) for f in failures),
                                 plugin=",".join(getattr(f, "plugin", "") for f in failures))


def _run_bounded(argv, stdin: bytes, env: dict, timeout_s: float):
    """subprocess.run, but a timeout kills the plugin's whole process group, so a child it
    forked cannot keep our pipes open."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd="/", close_fds=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout_s, output=out, stderr=err) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _plugin_failure(what: str, ptype: str, rc: int, stdout: bytes, stderr: str):
    code, detail = None, ""
    try:
        err = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        err = None
    if isinstance(err, dict) and ("code" in err or "msg" in err):
        code = err.get("code")
        detail = f"code {code}: {err.get('msg', '')}"
        if err.get("details"):
            detail += f" ({err['details']})"
    elif stdout.strip():
        detail = f"output {stdout[:512].decode('utf-8', 'replace')!r}"
    msg = f"{what} failed (exit {rc})"
    if detail:
        msg += f": {detail}"
    if stderr:
        msg += f"; stderr: {stderr}"
    if code == 11:  # spec: "try again later"
        return errors.Unavailable(msg)
    return CNIPluginError(msg, plugin=ptype, code=code if isinstance(code, int) else None,
                          stderr=stderr)


def check_id(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise errors.InvalidArgument(f"{field_name}: {value!r} must be 1-128 of [A-Za-z0-9_.-]")
    return value


def check_ifname(value: str, field_name: str = "ifname") -> str:
    if not isinstance(value, str) or not _IFNAME_RE.match(value):
        raise errors.InvalidArgument(f"{field_name}: {value!r} is not an interface name "
                                     "(1-15 of [A-Za-z0-9_.-])")
    return value


# -- result cache ---------------------------------------------------------------
class ResultCache:
    """One JSON file per attachment, kept across daemon restarts and reboots so DEL can
    release IPAM leases with the config and result that ADD used."""

    def __init__(self, cache_dir: str):
        self.dir = cache_dir

    def _path(self, container_id: str, ifname: str) -> str:
        return os.path.join(self.dir, f"{check_id(container_id, 'container_id')}-"
                                      f"{check_ifname(ifname)}.json")

    def save(self, container_id: str, ifname: str, entry: dict) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = self._path(container_id, ifname)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(entry, kind="vmcriCniCacheV1", containerId=container_id,
                           ifName=ifname), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, container_id: str, ifname: str) -> dict | None:
        try:
            with open(self._path(container_id, ifname)) as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring corrupt CNI cache entry for %s", container_id)
            return None
        return entry if isinstance(entry, dict) else None

    def remove(self, container_id: str, ifname: str) -> None:
        try:
            os.unlink(self._path(container_id, ifname))
        except FileNotFoundError:
            pass

    def entries(self) -> list[tuple[str, str]]:
        """(container_id, ifname) of every cached attachment, for reconcile."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        found = []
        for n in names:
            if not n.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, n)) as f:
                    entry = json.load(f)
                cid, ifname = entry["containerId"], entry["ifName"]
                check_id(cid, "containerId")
                check_ifname(ifname)
            except (OSError, ValueError, KeyError, TypeError, errors.InvalidArgument):
                log.warning("ignoring unreadable CNI cache file %s", n)
                continue
            found.append((cid, ifname))
        return found
