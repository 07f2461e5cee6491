#!/usr/bin/env bash
# Provisioning for the vmcri lab (see vagrant/README.md). Idempotent; runs as root.
#
#   provision.sh vmcri      vmcri as a systemd service + crictl (the "vmcri" machine)
#   provision.sh kube-cp    containerd + kubeadm control plane (the "cp" machine, VMCRI_LAB_KUBE=1)
#   provision.sh kube-node  joins this vmcri machine to that cluster (VMCRI_LAB_KUBE=1)
#
# Sourcing the file defines the steps without running anything (tests call them one by one).
# VMCRI_LAB_ROOT prefixes every file this script writes, so steps can be tried in a scratch dir.
set -euo pipefail

VMCRI_SRC=${VMCRI_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VMCRI_LAB_ROOT=${VMCRI_LAB_ROOT:-}
VMCRI_VENV=${VMCRI_VENV:-/opt/vmcri/venv}
SOCK=/run/vmcri/vmcri.sock

# crictl from the cri-tools GitHub release; the sha256 is the release's published checksum.
CRICTL_VERSION=v1.34.0
CRICTL_SHA256=a8ff2a3edb37a98daf3aba7c3b284fe0aa5bff24166d896ab9ef64c8913c9f51
CRICTL_URL=https://github.com/kubernetes-sigs/cri-tools/releases/download/${CRICTL_VERSION}/crictl-${CRICTL_VERSION}-linux-amd64.tar.gz

KUBE_MINOR=${VMCRI_LAB_KUBE_MINOR:-v1.33}
# The cluster's pod network: flannel (a hostNetwork DaemonSet; on the vmcri node it runs as
# a host sandbox, docs/host-sandboxes.md). Its default network is 10.244.0.0/16.
FLANNEL_VERSION=${VMCRI_LAB_FLANNEL_VERSION:-v0.26.1}
FLANNEL_URL=https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml
POD_SUBNET=10.244.0.0/16
CP_IP=${VMCRI_LAB_CP_IP:-192.168.124.10}
NODE_IP=${VMCRI_LAB_NODE_IP:-192.168.124.11}
JOIN_TOKEN=${VMCRI_LAB_TOKEN:-}

log() { printf '== %s\n' "$*"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }

# --- vmcri ---------------------------------------------------------------------------

# Exactly what the README's first command does before it starts the daemon.
install_vmcri() {
  log "installing vmcri from $VMCRI_SRC (scripts/install-deps.sh, vmcri image build)"
  bash "$VMCRI_SRC/scripts/install-deps.sh"
  if [ -d /run/systemd/system ]; then
    systemctl enable --now virtlogd.socket libvirtd.service
  fi
  bash "$VMCRI_SRC/scripts/start-libvirt.sh"
  "$VMCRI_VENV/bin/vmcri" image build
}

# The default pod network, only where no CNI config exists yet (as scripts/run.sh does).
install_cni_config() {
  local dir="$VMCRI_LAB_ROOT/etc/cni/net.d"
  if compgen -G "$dir/*.conf*" >/dev/null || compgen -G "$dir/*.json" >/dev/null; then
    log "keeping the CNI config in $dir"
    return 0
  fi
  install -D -m 0644 "$VMCRI_SRC/packaging/cni/10-vmcri-bridge.conflist" "$dir/10-vmcri-bridge.conflist"
  log "installed $dir/10-vmcri-bridge.conflist"
}

# fetch_verified URL SHA256 DEST: DEST appears only when the download has that checksum.
fetch_verified() {
  local url=$1 sha=$2 dest=$3 tmp
  tmp=$(mktemp "${dest}.XXXXXX")
  if ! curl -fsSL --retry 3 -o "$tmp" "$url"; then
    rm -f "$tmp"
    die "download failed: $url"
  fi
  if ! printf '%s  %s\n' "$sha" "$tmp" | sha256sum --check --quiet --status; then
    rm -f "$tmp"
    die "sha256 mismatch for $url (expected $sha)"
  fi
  mv "$tmp" "$dest"
}

install_crictl() {
  local bin="$VMCRI_LAB_ROOT/usr/local/bin/crictl" work
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qF "${CRICTL_VERSION#v}"; then
    log "crictl $CRICTL_VERSION already installed"
    return 0
  fi
  log "installing crictl $CRICTL_VERSION from $CRICTL_URL"
  work=$(mktemp -d)
  fetch_verified "$CRICTL_URL" "$CRICTL_SHA256" "$work/crictl.tar.gz"
  tar -xzf "$work/crictl.tar.gz" -C "$work" crictl
  install -D -m 0755 "$work/crictl" "$bin"
  rm -rf "$work"
}

write_configs() {
  install -D -m 0644 "$VMCRI_SRC/packaging/crictl.yaml" "$VMCRI_LAB_ROOT/etc/crictl.yaml"
  local cfg="$VMCRI_LAB_ROOT/etc/vmcri/config.toml"
  if [ ! -e "$cfg" ]; then
    install -d -m 0755 "$(dirname "$cfg")"
    # The lab is a systemd host; the kubelet learns the driver from vmcri's RuntimeConfig.
    printf '# vmcri lab settings; every other key has its default (vmcri config shows them)\ncgroup_driver = "systemd"\n' > "$cfg"
  fi
  log "wrote /etc/crictl.yaml and kept/wrote /etc/vmcri/config.toml"
}

install_service() {
  install -D -m 0644 "$VMCRI_SRC/packaging/systemd/vmcri.service" \
    "$VMCRI_LAB_ROOT/etc/systemd/system/vmcri.service"
  [ -z "$VMCRI_LAB_ROOT" ] || return 0
  [ -d /run/systemd/system ] || die "systemd is not running: start vmcri with scripts/run.sh instead"
  systemctl daemon-reload
  systemctl enable vmcri.service
  # KillMode=process: a restart picks up new code and leaves running pod VMs alone.
  systemctl restart vmcri.service
  local _
  for _ in $(seq 1 150); do
    [ -S "$SOCK" ] && break
    sleep 0.2
  done
  [ -S "$SOCK" ] || { journalctl -u vmcri --no-pager -n 30; die "vmcri did not create $SOCK"; }
  log "vmcri.service is running"
}

check_vmcri() {
  "$VMCRI_VENV/bin/vmcri" doctor || log "vmcri doctor reports a problem (see above)"
  crictl version
  crictl info >/dev/null && log "crictl reaches vmcri on $SOCK"
}

run_demo() {
  [ "${VMCRI_LAB_DEMO:-1}" = 1 ] || return 0
  log "vmcri demo (report: /home/vagrant/vmcri-demo.html)"
  install -d /home/vagrant
  "$VMCRI_VENV/bin/vmcri" demo --socket "$SOCK" --html /home/vagrant/vmcri-demo.html \
    || log "vmcri demo failed; the lab is still usable (see vagrant/README.md, troubleshooting)"
}

role_vmcri() {
  install_vmcri
  install_cni_config
  install_crictl
  write_configs
  install_service
  check_vmcri
  run_demo
}

# --- Kubernetes (VMCRI_LAB_KUBE=1) ---------------------------------------------------

kube_prereqs() {
  log "kubelet prerequisites: no swap, br_netfilter, ip_forward"
  swapoff -a
  sed -i '/\sswap\s/s/^/#/' /etc/fstab
  printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/k8s.conf
  modprobe overlay
  modprobe br_netfilter
  printf 'net.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\nnet.ipv4.ip_forward = 1\n' \
    > /etc/sysctl.d/99-k8s.conf
  sysctl --system >/dev/null
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -q
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends \
    apt-transport-https ca-certificates curl gpg conntrack socat ethtool iptables
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL "https://pkgs.k8s.io/core:/stable:/${KUBE_MINOR}/deb/Release.key" \
    | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
  echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/${KUBE_MINOR}/deb/ /" \
    > /etc/apt/sources.list.d/kubernetes.list
  apt-get -o DPkg::Lock::Timeout=900 update -q
  apt-get -o DPkg::Lock::Timeout=900 install -y -q kubelet kubeadm kubectl
  apt-mark hold kubelet kubeadm kubectl
}

require_token() {
  [[ "$JOIN_TOKEN" =~ ^[a-z0-9]{6}\.[a-z0-9]{16}$ ]] \
    || die "VMCRI_LAB_TOKEN must be a kubeadm bootstrap token ([a-z0-9]{6}.[a-z0-9]{16})"
}

# CNI plugins where flannel's DaemonSet installs its own (/opt/cni/bin, a hostPath), so
# that its "flannel" plugin finds Debian's bridge/portmap/host-local beside it.
link_cni_plugins() {
  install -d /opt/cni/bin
  local p
  for p in /usr/lib/cni/*; do
    [ -e "/opt/cni/bin/$(basename "$p")" ] || ln -s "$p" "/opt/cni/bin/$(basename "$p")"
  done
}

# The control plane runs on containerd on its own machine (kubeadm's static pods there);
# vmcri serves a worker node, where kube-proxy and flannel run as host sandboxes.
role_kube_cp() {
  require_token
  kube_prereqs
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends containerd containernetworking-plugins
  install -d /etc/containerd
  containerd config default \
    | sed -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
          -e 's#sandbox_image = ".*"#sandbox_image = "registry.k8s.io/pause:3.10"#' \
    > /etc/containerd/config.toml
  link_cni_plugins
  systemctl restart containerd
  # the pod network is flannel's, on both nodes (an earlier lab's static bridge goes)
  rm -f /etc/cni/net.d/10-cp-bridge.conflist
  if [ ! -f /etc/kubernetes/admin.conf ]; then
    log "kubeadm init (control plane on containerd, API on $CP_IP:6443)"
    cat > /root/kubeadm-init.yaml <<EOF
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
  - token: "$JOIN_TOKEN"
    ttl: "0s"
localAPIEndpoint:
  advertiseAddress: "$CP_IP"
nodeRegistration:
  criSocket: unix:///run/containerd/containerd.sock
  kubeletExtraArgs:
    - name: node-ip
      value: "$CP_IP"
  taints: []
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
controlPlaneEndpoint: "$CP_IP:6443"
networking:
  podSubnet: "$POD_SUBNET"
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
EOF
    kubeadm init --config /root/kubeadm-init.yaml
  fi
  install -d -m 0700 /root/.kube
  install -m 0600 /etc/kubernetes/admin.conf /root/.kube/config
  if id vagrant >/dev/null 2>&1; then
    install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.kube
    install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
  fi
  export KUBECONFIG=/etc/kubernetes/admin.conf
  # kube-proxy and flannel are hostNetwork DaemonSets that tolerate every NoSchedule taint:
  # they run on the vmcri node too, as host sandboxes, so ClusterIP Services work from its
  # pod VMs. An earlier lab's affinity that kept kube-proxy off that node is dropped.
  kubectl -n kube-system patch daemonset kube-proxy --type json \
    -p '[{"op":"remove","path":"/spec/template/spec/affinity"}]' 2>/dev/null || true
  log "applying flannel $FLANNEL_VERSION ($FLANNEL_URL)"
  kubectl apply -f "$FLANNEL_URL"
  kubectl apply -f "$VMCRI_SRC/packaging/k8s/runtimeclass.yaml"
  kubectl apply -f "$VMCRI_SRC/packaging/k8s/demo-pod.yaml"
  log "control plane ready; the demo pod waits for the vmcri node (kubectl get pod vmcri-demo -o wide)"
}

role_kube_node() {
  require_token
  kube_prereqs
  install -D -m 0644 "$VMCRI_SRC/packaging/kubelet/20-vmcri.conf" \
    /etc/systemd/system/kubelet.service.d/20-vmcri.conf
  systemctl daemon-reload
  # In the cluster the pod network is flannel's: its DaemonSet (a host sandbox here) writes
  # 10-flannel.conflist, and until then the node is NotReady, as any kubeadm node. The
  # stand-alone lab's bridge config would hand out addresses outside the cluster's network.
  link_cni_plugins
  if [ -f /etc/cni/net.d/10-vmcri-bridge.conflist ]; then
    rm -f /etc/cni/net.d/10-vmcri-bridge.conflist
    systemctl restart vmcri.service  # NetworkReady follows the config dir
  fi
  if [ -f /etc/kubernetes/kubelet.conf ]; then
    log "already joined"
    return 0
  fi
  sed -e "s/@CP_ENDPOINT@/$CP_IP:6443/" -e "s/@TOKEN@/$JOIN_TOKEN/" -e "s/@NODE_IP@/$NODE_IP/" \
    "$VMCRI_SRC/packaging/kubelet/kubeadm-join.yaml" > /root/kubeadm-join.yaml
  local _
  for _ in $(seq 1 90); do  # the cp machine may still be coming up (vagrant up runs in parallel)
    curl -ksf "https://$CP_IP:6443/readyz" >/dev/null && break
    sleep 10
  done
  log "kubeadm join $CP_IP:6443 with --cri-socket $SOCK"
  kubeadm join --config /root/kubeadm-join.yaml
}

main() {
  [ "$(id -u)" = 0 ] || die "run as root"
  case "${1:-vmcri}" in
    vmcri) role_vmcri ;;
    kube-cp) role_kube_cp ;;
    kube-node) role_kube_node ;;
    *) die "unknown role '$1' (vmcri | kube-cp | kube-node)" ;;
  esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
