"""Guest image: Debian generic kernel (as ELF vmlinux), busybox initramfs, erofs root with
python3.11 + paramiko + crun + busybox + the vmcri agent. See images/README.md."""
from .builder import BuildError, GuestImage, build, content_hash, guest_root, locate

__all__ = ["BuildError", "GuestImage", "build", "content_hash", "guest_root", "locate"]
